"""Role ``expert_host``: a peer that hosts a share of one or more expert grids (see ``hivesim.moe``).

Params (all optional): ``uid_prefixes`` (one grid per prefix, e.g. one per DMoE layer; default
``["ffn"]``), ``grid_size``, ``expert_cls``, ``hidden_dim``, ``expert_kwargs``, ``lr`` (Adam),
``max_batch_size``, ``expiration``, ``update_period``, ``device``, ``checkpoint_dir``,
``checkpoint_period``, ``seed``.
Which experts a peer hosts: ``expert_uids`` (a list or pattern such as ``"ffn.[0:4].[0:4]"``), or else
its share of every grid: hosts are dealt the grid cells round-robin by the index in the peer's name
(``experts.3`` is host 3) out of ``hosts``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hivesim.moe.server import ExpertServer, adam
from hivesim.moe.uids import expand_pattern, share_of_grid
from hivesim.roles import Role


def peer_index(name: str) -> int:
    """``"experts.3"`` -> 3 (0 when the name has no numeric suffix)."""
    tail = name.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class ExpertHost(Role):
    name = "expert_host"

    def __init__(self, peer: Any, *, uid_prefixes: list[str] | None = None, grid_size: list[int] | None = None,
                 expert_uids: list[str] | str | None = None, hosts: int = 1, expert_cls: str = "ffn",
                 hidden_dim: int = 64, expert_kwargs: dict | None = None, lr: float = 1e-3,
                 max_batch_size: int = 4096, expiration: float = 30.0, update_period: float | None = None,
                 device: str | None = None, checkpoint_dir: str | None = None, checkpoint_period: float | None = None,
                 seed: int | None = None) -> None:
        super().__init__(peer)
        if expert_uids is not None:
            uids = expand_pattern(expert_uids) if isinstance(expert_uids, str) else list(expert_uids)
        else:
            index = peer_index(peer.name) % max(1, hosts)
            uids = [u for prefix in (uid_prefixes or ["ffn"])
                    for u in share_of_grid(prefix, grid_size or [4, 4], index, max(1, hosts), seed or 0)]
        self.server = ExpertServer.create(
            uids, expert_cls, hidden_dim, optimizer=adam(lr), device=device, expert_kwargs=expert_kwargs,
            seed=seed, dht=None, max_batch_size=max_batch_size, expiration=expiration, update_period=update_period,
            checkpoint_dir=checkpoint_dir, checkpoint_period=checkpoint_period)

    async def start(self) -> None:
        self.server.dht = self.peer.dht
        await self.server.start()
        self.peer.metrics.event("experts_declared", experts=len(self.server.backends), restored=len(self.server.restored))
        self.peer.spawn(self._until_killed(), name="expert_host.guard")

    async def _until_killed(self) -> None:
        """An abrupt kill cancels the peer's tasks: take the server's loops and runtime thread with it."""
        try:
            await asyncio.Event().wait()
        finally:
            for task in self.server._tasks:
                task.cancel()
            self.server.runtime.stop(timeout=0)

    async def stop(self) -> None:
        await self.server.stop()

    def status(self) -> dict[str, Any]:
        stats = self.server.runtime.stats
        return {"experts": len(self.server.backends), "batches": stats.batches, "samples": stats.samples}


ROLE = ExpertHost
