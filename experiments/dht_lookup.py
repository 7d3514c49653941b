"""DHT lookups under churn: every peer keeps its own keys in the DHT and looks up other peers' keys.

Each peer declares itself under a shared ``directory`` key (one subkey per peer) and stores
``keys_per_peer`` keys of its own, re-storing them every ``refresh`` seconds with an expiration of
``ttl`` seconds. Every ``interval`` seconds it looks up a random key of a random peer listed in the
directory and records the lookup's latency, success and depth in hops. A peer that died stays in the
directory (and its keys in the DHT) until ``ttl`` runs out, so a lookup only fails when every replica of
a key was lost, or a lookup could not find the replicas that remain.

``directory_shards`` splits the directory into that many keys (a peer declares itself in one, chosen by
its name, and reads one shard per ``directory_every``, keeping what it learnt from the others). One
directory key costs every reader a reply of one subkey per peer from each replica: at 1,024 peers that
is about ten thousand records per read, and the swarm's first reads alone would take minutes of CPU.
``directory_latest=False`` reads a shard from the first replica found instead of all of them (a directory
that misses a late declaration only narrows the choice of lookup targets).
With ``stagger``, a peer makes its first store at a random moment of its first ``refresh`` period and its
first lookup at a random moment of its first ``interval`` after ``warmup``, as peers that do not all start
at one instant would (1,024 peers storing at once queue for minutes on a small machine).
"""

from __future__ import annotations

import asyncio
import random
import zlib
import time
from typing import Any

import numpy as np

from hivesim.dht.storage import get_dht_time
from hivesim.roles import Role


class DHTLookupWorkload(Role):
    name = "dht_lookup"

    def __init__(self, peer: Any, keys_per_peer: int = 4, interval: float = 0.5, refresh: float = 10.0,
                 ttl: float = 30.0, directory_every: float = 5.0, latest: bool = False, warmup: float = 2.0,
                 directory_shards: int = 1, directory_latest: bool = True, stagger: bool = False) -> None:
        super().__init__(peer)
        if directory_shards < 1:
            raise ValueError(f"directory_shards must be at least 1, not {directory_shards}")
        self.keys_per_peer = keys_per_peer
        self.interval = interval
        self.refresh = refresh
        self.ttl = ttl
        self.directory_every = directory_every
        self.latest = latest
        self.warmup = warmup
        self.rng = random.Random(f"{peer.name}:{time.time()}")
        self.directory_shards = directory_shards
        self.directory_latest = directory_latest
        self.stagger = stagger
        self.known: list[str] = []
        self._known_by_shard: dict[int, list[str]] = {}
        self.done = 0

    def _directory_key(self, shard: int) -> str:
        return "directory" if self.directory_shards == 1 else f"directory.{shard}"

    async def start(self) -> None:
        self.peer.spawn(self._declare(), name="dht_lookup.declare")
        self.peer.spawn(self._look_up(), name="dht_lookup.look_up")

    async def _declare(self) -> None:
        dht = self.peer.dht
        my_shard = zlib.crc32(self.peer.name.encode()) % self.directory_shards
        if self.stagger:
            await asyncio.sleep(self.refresh * self.rng.random())
        while True:
            expiration = get_dht_time() + self.ttl
            items = [(f"key.{self.peer.name}.{j}", {"owner": self.peer.name, "j": j}, expiration) for j in range(self.keys_per_peer)]
            items.append((self._directory_key(my_shard), self.keys_per_peer, expiration, self.peer.name))
            self.peer.metrics.count("stores", len(items))
            try:
                outcome = await dht.store_many(items)
            except Exception as e:  # counted, and tried again next period: one failure must not end the peer's part
                self.peer.metrics.count("store_errors")
                self.peer.metrics.event("store_failed", error=repr(e))
            else:
                self.peer.metrics.count("stores_ok", sum(bool(v) for v in outcome.values()))
            await asyncio.sleep(self.refresh * (0.9 + 0.2 * self.rng.random()))

    async def _look_up(self) -> None:
        dht = self.peer.dht
        await asyncio.sleep(self.warmup + (self.interval * self.rng.random() if self.stagger else 0.0))
        next_directory = 0.0
        while True:
            if time.monotonic() >= next_directory:
                shard = self.rng.randrange(self.directory_shards)
                try:
                    found = await dht.get(self._directory_key(shard), latest=self.directory_latest)
                except Exception as e:
                    self.peer.metrics.event("directory_failed", error=repr(e))
                    found = None
                if found is not None and isinstance(found.value, dict):
                    self._known_by_shard[shard] = [k for k in found.value if isinstance(k, str) and k != self.peer.name]
                    self.known = sorted(k for names in self._known_by_shard.values() for k in names)
                # an empty directory (nobody declared yet) is read again at the next lookup, not a period later
                next_directory = time.monotonic() + (self.directory_every if self.known else 0.0)
            if self.known:
                owner = self.rng.choice(self.known)
                key = f"key.{owner}.{self.rng.randrange(self.keys_per_peer)}"
                t0 = time.perf_counter()
                try:
                    value, stats = await dht.lookup(key, latest=self.latest)
                except Exception as e:  # a lookup that raised was not found; the loop goes on
                    self.peer.metrics.event("lookup_failed", error=repr(e))
                    value, hops, requests = None, -1, -1
                else:
                    hops, requests = stats.hops, stats.requests
                latency = time.perf_counter() - t0
                ok = value is not None and isinstance(value.value, dict) and value.value.get("owner") == owner
                # the swarm as this peer sees it: the peers it knows, scaled up by the shards it has not read
                swarm = round(len(self.known) * self.directory_shards / len(self._known_by_shard)) + 1
                self.peer.metrics.sample("lookup", latency, ok=ok, hops=hops, requests=requests, swarm=swarm, owner=owner)
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
    remote = [s for s in lookups if s["hops"] > 0]  # hops 0: the peer held a replica itself; -1: it raised
    latency = np.array([s["value"] for s in remote] or [0.0]) * 1e3
    return {
        "lookups": len(lookups),
        "success_rate": round(float(ok.mean()), 4),
        "raised": sum(s["hops"] < 0 for s in lookups),
        "answered_locally": round(sum(s["hops"] == 0 for s in lookups) / len(lookups), 3),
        "remote_latency_ms_p50": round(float(np.percentile(latency, 50)), 2),
        "remote_latency_ms_p95": round(float(np.percentile(latency, 95)), 2),
        "remote_latency_ms_p99": round(float(np.percentile(latency, 99)), 2),
        "remote_hops_mean": round(float(np.mean([s["hops"] for s in remote] or [0])), 2),
        "swarm_size_max": int(max(s["swarm"] for s in lookups)),  # the largest swarm a peer's directory showed
        "owners_looked_up": len({s["owner"] for s in lookups if "owner" in s}),  # distinct peers whose keys were sought
    }


def headline(run: Any) -> str:
    recent = [s for s in _lookups(run) if s["t"] > time.time() - 10]
    if not recent:
        return "lookups: waiting"
    ok = sum(s["ok"] for s in recent) / len(recent)
    remote = [s["value"] for s in recent if s["hops"] > 0]
    p50 = float(np.median(remote)) * 1e3 if remote else 0.0
    return f"lookups found {ok:.1%}  remote p50 {p50:.0f} ms"
