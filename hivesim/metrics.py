"""What a peer measures, kept as plain data so it can cross any boundary (Ray, JSON, a file).

Counters add up; samples are timestamped measurements (a lookup's latency, a round's error); events
are timestamped happenings (joined, killed, a partition began). Timestamps are wall-clock seconds so
that peers in different processes and the runner agree on them. ``drain()`` hands out what is new
since the last drain and forgets it, which lets a runner collect metrics incrementally (and keeps a
long-running peer's memory flat) and lose little when a peer dies between collections.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any


class Metrics:
    """Counters, samples and events of one peer."""

    def __init__(self, peer: str = "") -> None:
        self.peer = peer
        self.counters: Counter[str] = Counter()
        self._samples: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []

    def count(self, name: str, n: int | float = 1) -> None:
        self.counters[name] += n

    def sample(self, name: str, value: float, **fields: Any) -> None:
        self._samples.append({"t": time.time(), "peer": self.peer, "name": name, "value": value, **fields})

    def event(self, kind: str, **fields: Any) -> None:
        self._events.append({"t": time.time(), "peer": self.peer, "kind": kind, **fields})

    def samples(self, name: str | None = None) -> list[dict[str, Any]]:
        return [s for s in self._samples if name is None or s["name"] == name]

    def events(self) -> list[dict[str, Any]]:
        return list(self._events)

    def drain(self) -> dict[str, Any]:
        """Samples and events recorded since the last drain (then forgotten here), plus the counters."""
        out = {"peer": self.peer, "counters": dict(self.counters), "samples": self._samples, "events": self._events}
        self._samples, self._events = [], []
        return out

    def snapshot(self) -> dict[str, Any]:
        """What has not been drained yet, without forgetting it."""
        return {"peer": self.peer, "counters": dict(self.counters), "samples": list(self._samples), "events": list(self._events)}
