"""DHT lookups under churn: every peer keeps its own keys in the DHT and looks up other peers' keys.

Each peer declares itself under a shared ``directory`` key (one subkey per peer) and stores
``keys_per_peer`` keys of its own, re-storing them every ``refresh`` seconds with an expiration of
``ttl`` seconds. Every ``interval`` seconds it looks up a random key of a random peer listed in the
directory and records the lookup's latency, success and depth in hops. A peer that died stays in the
directory (and its keys in the DHT) until ``ttl`` runs out, so a lookup only fails when every replica of
a key was lost, or a lookup could not find the replicas that remain.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np

from hivesim.dht.storage import get_dht_time
from hivesim.roles import Role


class DHTLookupWorkload(Role):
    name = "dht_lookup"

    def __init__(self, peer: Any, keys_per_peer: int = 4, interval: float = 0.5, refresh: float = 10.0,
                 ttl: float = 30.0, directory_every: float = 5.0, latest: bool = False, warmup: float = 2.0) -> None:
        super().__init__(peer)
        self.keys_per_peer = keys_per_peer
        self.interval = interval
        self.refresh = refresh
        self.ttl = ttl
        self.directory_every = directory_every
        self.latest = latest
        self.warmup = warmup
        self.rng = random.Random(f"{peer.name}:{time.time()}")
        self.known: list[str] = []
        self.done = 0

    async def start(self) -> None:
        self.peer.spawn(self._declare(), name="dht_lookup.declare")
        self.peer.spawn(self._look_up(), name="dht_lookup.look_up")

    async def _declare(self) -> None:
        dht = self.peer.dht
        while True:
            expiration = get_dht_time() + self.ttl
            items = [(f"key.{self.peer.name}.{j}", {"owner": self.peer.name, "j": j}, expiration) for j in range(self.keys_per_peer)]
            items.append(("directory", self.keys_per_peer, expiration, self.peer.name))
            outcome = await dht.store_many(items)
            self.peer.metrics.count("stores", len(items))
            self.peer.metrics.count("stores_ok", sum(bool(v) for v in outcome.values()))
            await asyncio.sleep(self.refresh * (0.9 + 0.2 * self.rng.random()))

    async def _look_up(self) -> None:
        dht = self.peer.dht
        await asyncio.sleep(self.warmup)
        next_directory = 0.0
        while True:
            if time.monotonic() >= next_directory:
                found = await dht.get("directory", latest=True)
                if found is not None and isinstance(found.value, dict):
                    self.known = sorted(k for k in found.value if isinstance(k, str) and k != self.peer.name)
                next_directory = time.monotonic() + self.directory_every
            if self.known:
                owner = self.rng.choice(self.known)
                key = f"key.{owner}.{self.rng.randrange(self.keys_per_peer)}"
                t0 = time.perf_counter()
                value, stats = await dht.lookup(key, latest=self.latest)
                latency = time.perf_counter() - t0
                ok = value is not None and isinstance(value.value, dict) and value.value.get("owner") == owner
                self.peer.metrics.sample("lookup", latency, ok=ok, hops=stats.hops, requests=stats.requests,
                                         swarm=len(self.known) + 1)
                self.done += 1
            await asyncio.sleep(self.interval * (0.5 + self.rng.random()))

    def status(self) -> dict[str, Any]:
        return {"lookups": self.done}


ROLE = DHTLookupWorkload


def _lookups(run: Any) -> list[dict[str, Any]]:
    return run.named("lookup")


def summarize(run: Any) -> dict[str, Any]:
    lookups = _lookups(run)
    if not lookups:
        return {"lookups": 0}
    ok = np.array([s["ok"] for s in lookups])
    remote = [s for s in lookups if s["hops"] > 0]  # hops 0: the peer held a replica itself
    latency = np.array([s["value"] for s in remote] or [0.0]) * 1e3
    return {
        "lookups": len(lookups),
        "success_rate": round(float(ok.mean()), 4),
        "answered_locally": round(1 - len(remote) / len(lookups), 3),
        "remote_latency_ms_p50": round(float(np.percentile(latency, 50)), 2),
        "remote_latency_ms_p95": round(float(np.percentile(latency, 95)), 2),
        "remote_latency_ms_p99": round(float(np.percentile(latency, 99)), 2),
        "remote_hops_mean": round(float(np.mean([s["hops"] for s in remote] or [0])), 2),
        "swarm_size_max": int(max(s["swarm"] for s in lookups)),
    }


def headline(run: Any) -> str:
    recent = [s for s in _lookups(run) if s["t"] > time.time() - 10]
    if not recent:
        return "lookups: waiting"
    ok = sum(s["ok"] for s in recent) / len(recent)
    remote = [s["value"] for s in recent if s["hops"] > 0]
    p50 = float(np.median(remote)) * 1e3 if remote else 0.0
    return f"lookups found {ok:.1%}  remote p50 {p50:.0f} ms"
