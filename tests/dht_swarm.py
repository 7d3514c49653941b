"""Helpers to build swarms of real DHT nodes on loopback, in the test's own event loop."""

from __future__ import annotations

import asyncio
import random

from hivesim.dht import DHTNode


async def make_swarm(n: int, seed: int = 0, **kwargs) -> list[DHTNode]:
    """``n`` nodes, each bootstrapped from up to 3 random earlier ones (as hivemind's benchmark does)."""
    rng = random.Random(seed)
    nodes = [await DHTNode.create(**kwargs)]
    for _ in range(n - 1):
        contacts = rng.sample(nodes, min(3, len(nodes)))
        nodes.append(await DHTNode.create([c.address for c in contacts], **kwargs))
    return nodes


async def stop_all(nodes) -> None:
    await asyncio.gather(*(node.shutdown() for node in nodes), return_exceptions=True)
