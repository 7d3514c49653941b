"""``PeerHost``: the Ray actor that runs one or more :class:`~hivesim.peer.Peer` objects.

The actor's own event loop runs the peers: their tasks are started from async methods and keep
running between method calls (a restarted actor would have to start them again, which is why the
runner re-creates a killed actor instead of letting Ray restart it). Control (start, kill, drain
metrics) comes through Ray; data between peers never does — it goes over their ZeroMQ sockets.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
from typing import Any

from hivesim.net.identity import Identity
from hivesim.peer import Peer
from hivesim.roles import load_role
from hivesim.net.links import ShapedLinks
from hivesim.sim.latency import LatencyModel

logger = logging.getLogger(__name__)


class PeerHost:
    """Hosts peers in one process. Wrapped with ``ray.remote`` by the runner (see ``remote_host``)."""

    def __init__(self, latency: LatencyModel | None, host: str = "127.0.0.1", advertise_host: str | None = None) -> None:
        self.latency = latency
        if host == "0.0.0.0" and advertise_host is None:  # on a cluster: others reach us at the node's address
            import ray

            advertise_host = ray.util.get_node_ip_address()
            if advertise_host.startswith("127."):  # a cluster of nodes on one machine (pinned to loopback):
                host = advertise_host  # listen there only, not on every interface
        self.host = host
        self.advertise_host = advertise_host
        self.peers: dict[str, Peer] = {}
        self.finished: list[dict[str, Any]] = []  # metrics of peers that left, not yet drained
        self.sides: dict[str, int] = {}
        # A packed host's heap is mostly long-lived (Ray, the imports, then each peer's tables and sockets),
        # and every full collection walks all of it: at 128 peers per process that was a large share of
        # the CPU. Frozen objects are left out of collections (a killed peer's frozen cycles are not freed).
        gc.freeze()

    async def start_peer(self, name: str, spec: dict[str, Any], initial_peers: list[str]) -> str:
        """Start peer ``name``; returns its address. ``spec``: roles, dht, links (or None), identity."""
        links = None
        if spec.get("links") is not None and self.latency is not None:
            links = ShapedLinks(name, self.latency, **spec["links"])
            links.sides = self.sides
        identity = Identity.from_private_bytes(spec["identity"]) if spec.get("identity") else None
        peer = Peer(
            name,
            spec.get("roles"),
            host=self.host,
            advertise_host=self.advertise_host,
            links=links,
            identity=identity,
            dht=spec.get("dht"),
            endpoint=spec.get("endpoint"),
        )
        peer.slowdown = float(spec.get("slowdown", 1.0))  # roles that compute may honour it
        await peer.start(initial_peers)
        self.peers[name] = peer
        gc.freeze()
        return peer.address

    async def add_role(self, name: str, role: str, params: dict[str, Any]) -> None:
        """Start one more role (the run's workload) on a running peer."""
        peer = self.peers[name]
        instance = load_role(role)(peer, **params)
        await instance.start()
        peer.roles[role] = instance

    async def stop_peer(self, name: str, graceful: bool) -> bool:
        peer = self.peers.pop(name, None)
        if peer is None:
            return False
        if graceful:
            await peer.stop()
        else:
            await peer.kill()
        self.finished.append(_collect(peer))
        return True

    async def stop_all(self, graceful: bool = True) -> None:
        await asyncio.gather(*(self.stop_peer(n, graceful) for n in list(self.peers)), return_exceptions=True)

    async def drain(self) -> list[dict[str, Any]]:
        """Metrics recorded since the last drain, of running peers and of peers that left since."""
        out, self.finished = self.finished, []
        return out + [_collect(peer) for peer in self.peers.values()]

    async def status(self) -> list[dict[str, Any]]:
        return [peer.status() for peer in self.peers.values()]

    async def set_sides(self, sides: dict[str, int]) -> None:
        """Partition: traffic between peers on different sides is dropped (shared by all local links)."""
        self.sides.clear()
        self.sides.update(sides)

    async def memory(self) -> dict[str, float]:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with open(f"/proc/{os.getpid()}/statm") as f:
            current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        return {"pid": os.getpid(), "rss_mib": current, "peak_mib": rss, "peers": len(self.peers), "node": _node_id()}

    async def dht_get(self, name: str, key: Any, latest: bool = False) -> Any:
        """Read a key through peer ``name``'s DHT node (for checks from the driver)."""
        found = await self.peers[name].dht.get(key, latest=latest)
        return None if found is None else found.value

    async def measure_rtt(self, name: str, address: str, count: int = 5) -> list[float]:
        """Round-trip times (s) of DHT pings from peer ``name`` to ``address``: what shaping produced."""
        import time

        from hivesim.dht.protocol import PING

        peer, out = self.peers[name], []
        for _ in range(count):
            t0 = time.monotonic()
            await peer.endpoint.call(address, PING, {"from": None}, timeout=10)
            out.append(time.monotonic() - t0)
        return out

    def ready(self) -> bool:
        return True


def _node_id() -> str | None:
    """The Ray node this actor runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _collect(peer: Peer) -> dict[str, Any]:
    item = peer.metrics.drain()
    item["shaping"] = peer.endpoint.lateness.summary() if peer.endpoint.links.shaped else None
    item["rpc"] = dict(peer.endpoint.stats)
    return item
