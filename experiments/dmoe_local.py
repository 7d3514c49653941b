"""A small swarm of ``Peer`` objects in one process and one event loop, for the DMoE studies.

The studies compare several setups (and a sweep of latencies); on a 2-core machine, peers that share one
process and one event loop (torch work in executor threads) finish them in a minute or two, where one
Ray actor per peer would spend that on start-up. The peers, roles, RPCs and link shaping are exactly
those of a ``hivesim run``; only the placement differs. Results are written as a ``hivesim run``
results folder (``samples.jsonl``, ``events.jsonl``, ``summary.json``), so ``analysis/`` reads both.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from hivesim.net.links import ShapedLinks
from hivesim.peer import Peer


class LocalSwarm:
    """Peers started in the running event loop; ``latency`` (one-way seconds per hop, or a function of
    ``(src, dst)`` that a sweep can change while peers run) shapes every link."""

    def __init__(self, latency: float | Callable[[str, str], float] = 0.0, seed: int = 0) -> None:
        self.latency = latency
        self.seed = seed
        self.peers: dict[str, Peer] = {}
        self.events: list[dict[str, Any]] = []
        self._retired: list[dict[str, Any]] = []  # samples of peers replaced by a rejoin
        self.t0 = time.time()

    def _links(self, name: str) -> ShapedLinks | None:
        if callable(self.latency) or self.latency > 0:
            return ShapedLinks(name, self.latency, seed=self.seed)
        return None

    async def add(self, name: str, roles: dict[str, dict[str, Any]]) -> Peer:
        initial = [p.address for p in list(self.peers.values())[:3] if p.state == "running"]
        peer = Peer(name, roles, links=self._links(name), dht={"rpc_timeout": 3.0})
        await peer.start(initial)
        self.peers[name] = peer
        self.events.append({"wall": time.time(), "t": time.time() - self.t0, "action": "join", "peer": name, "ok": True})
        return peer

    async def add_many(self, names: Iterable[str], roles: dict[str, dict[str, Any]]) -> list[Peer]:
        return [await self.add(name, roles) for name in names]

    async def kill(self, name: str) -> None:
        """Abrupt: sockets close, tasks are cancelled; no goodbye."""
        peer = self.peers[name]
        await peer.kill()
        self.events.append({"wall": time.time(), "t": time.time() - self.t0, "action": "kill", "peer": name, "ok": True})

    async def rejoin(self, name: str) -> Peer:
        """A fresh peer under a killed peer's name, with the same roles (an expert host restores its
        experts from its checkpoint folder); the old incarnation's metrics are kept."""
        old = self.peers.pop(name)
        self._retired += self._drain(old)
        return await self.add(name, old.role_specs)

    def _drain(self, peer: Peer) -> list[dict[str, Any]]:
        drained = peer.metrics.drain()
        self.events += [dict(e, wall=e["t"], action=e.get("kind")) for e in drained["events"]
                        if e.get("kind") not in ("started", "stopped", "killed")]
        return drained["samples"]

    def collect(self) -> list[dict[str, Any]]:
        """Drain every peer's samples; their events (step errors...) join :attr:`events`."""
        samples, self._retired = self._retired, []
        for peer in self.peers.values():
            samples += self._drain(peer)
        return samples

    def collect_peek(self) -> list[dict[str, Any]]:
        """Every sample so far, without draining."""
        samples: list[dict[str, Any]] = []
        for peer in self.peers.values():
            samples += peer.metrics.snapshot()["samples"]
        return samples

    async def close(self) -> None:
        for peer in reversed(list(self.peers.values())):
            try:
                await peer.stop(timeout=5)
            except Exception:  # noqa: BLE001 - keep closing the others
                await peer.kill()


def results_folder(name: str, root: str | Path = "results") -> Path:
    path = Path(root) / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(run_dir: Path, config: dict[str, Any], samples: list[dict[str, Any]], events: list[dict[str, Any]],
                  summary: dict[str, Any]) -> None:
    (run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    with open(run_dir / "samples.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps(s, default=float) + "\n")
    with open(run_dir / "events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e, default=str) + "\n")
    summary = {"name": config.get("name", run_dir.name), "load_average": os.getloadavg(), **summary}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
