"""A tiny workload for the multi-node cluster test (tests/test_ray_cluster.py): every peer stores a record
of where it runs (its Ray node id and its address) in the DHT, then reads every other peer's record
until it has found them all. A found record whose node differs from the reader's is a value stored by a
peer of another Ray node and read through the DHT: proof that peers on different nodes talked.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hivesim.dht.storage import get_dht_time
from hivesim.roles import Role


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class ClusterProbe(Role):
    name = "cluster_probe"

    def __init__(self, peer: Any, interval: float = 0.5, ttl: float = 120.0) -> None:
        super().__init__(peer)
        self.interval = interval
        self.ttl = ttl
        self.node = _node_id()
        self.found: set[str] = set()

    async def start(self) -> None:
        self.peer.spawn(self._probe(), name="cluster_probe")

    async def _probe(self) -> None:
        dht, me = self.peer.dht, self.peer.name
        expiration = get_dht_time() + self.ttl
        record = {"peer": me, "node": self.node, "address": self.peer.address}
        await dht.store_many([(f"probe.{me}", record, expiration), ("probe.directory", self.node, expiration, me)])
        self.peer.metrics.sample("placed", 0.0, node=self.node, address=self.peer.address)
        for _ in range(10_000):  # bounded: the run's duration ends it long before
            await asyncio.sleep(self.interval)
            await dht.store("probe.directory", self.node, expiration, me)  # re-declare, cheap and idempotent
            directory = await dht.get("probe.directory", latest=True)
            others = sorted(k for k in (directory.value if directory else {}) if isinstance(k, str) and k != me)
            for other in others:
                if other in self.found:
                    continue
                t0 = time.perf_counter()
                found = await dht.get(f"probe.{other}")
                if found is None or not isinstance(found.value, dict) or found.value.get("peer") != other:
                    continue
                self.found.add(other)
                self.peer.metrics.sample("probe", time.perf_counter() - t0, owner=other, node=self.node,
                                         owner_node=found.value["node"], owner_address=found.value["address"])

    def status(self) -> dict[str, Any]:
        return {"found": len(self.found)}


ROLE = ClusterProbe


def finished(run: Any, alive: list[str]) -> bool:
    """Every live peer found every other peer's record: nothing left to measure."""
    found: dict[str, set[str]] = {}
    for s in run.named("probe"):
        found.setdefault(s["peer"], set()).add(s["owner"])
    return bool(alive) and all(found.get(p, set()) >= set(alive) - {p} for p in alive)


def summarize(run: Any) -> dict[str, Any]:
    probes = run.named("probe")
    return {
        "nodes": sorted({s["node"] for s in run.named("placed")}),
        "probes": len(probes),
        "cross_node_found": sum(s["node"] != s["owner_node"] for s in probes),
    }
