"""The ``averager`` role: a peer that periodically averages a tensor with the swarm.

Topology use::

    roles: {averager: {size: 100000, target_group_size: 4, period: 2.0, compression: float16}}

Every ``period`` seconds the peer runs one :meth:`AveragerCore.step` on its endpoint and DHT node (in the
peer's own event loop) and records an ``averaging_step`` sample: whether a group formed, its size, the
fraction of the vector averaged, and how long matchmaking and the all-reduce took.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import torch

from hivesim.averaging.averager import AveragerCore
from hivesim.roles import Role


class AveragerRole(Role):
    name = "averager"

    def __init__(self, peer: Any, size: int = 1000, prefix: str = "params", target_group_size: int = 4,
                 min_group_size: int = 2, period: float = 2.0, initial_group_bits: str = "", weight: float = 1.0,
                 **averager_kwargs: Any) -> None:
        super().__init__(peer)
        if size <= 0 or period <= 0:
            raise ValueError("averager: size and period must be positive")
        self.period = period
        self.weight = weight
        self.core = AveragerCore(peer.endpoint, peer.dht, [torch.randn(size)], prefix=prefix,
                                 target_group_size=target_group_size, min_group_size=min_group_size,
                                 initial_group_bits=initial_group_bits, **averager_kwargs)
        self.rng = random.Random(peer.name)

    async def start(self) -> None:
        await self.core.start()
        self.peer.spawn(self._loop(), name="averager.loop")

    async def stop(self) -> None:
        await self.core.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period * (0.9 + 0.2 * self.rng.random()))
            result = await self.core.step(weight=self.weight)
            metrics = self.peer.metrics
            if result is None:
                metrics.sample("averaging_step", 0.0, ok=False)
                continue
            metrics.sample("averaging_step", result.averaged_fraction, ok=True, group=result.group_size,
                           matchmaking_s=round(result.matchmaking_s, 4), allreduce_s=round(result.allreduce_s, 4))

    def status(self) -> dict[str, Any]:
        return self.core.status()


ROLE = AveragerRole
