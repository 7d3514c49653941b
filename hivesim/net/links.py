"""The link model: the one place where simulated network conditions live.

Deployment uses :class:`IdentityLinks` (no shaping, no overhead). Simulation gives each peer a
:class:`ShapedLinks`: the sender waits for its uplink (a token bucket, so concurrent sends share it)
before a frame leaves, stamps the frame with its departure time and link tag, and the receiver holds
the frame until ``departure + delay(src, dst, nbytes)`` and until its own downlink has carried it.
All peers of a simulation share one host clock (``time.monotonic`` is system-wide on Linux), which is
what makes the receiver-side hold exact across processes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Union

LatencySpec = Union[float, Mapping[tuple[str, str], float], Callable[[str, str], float]]


class TokenBucket:
    """A link of ``rate`` bytes/s that lets ``burst`` bytes through at once.

    ``reserve`` never refuses: it books the bytes and returns when they will have crossed the link,
    running into debt when the link is busy, so concurrent senders queue behind each other fairly.
    """

    def __init__(self, rate: float, burst: float = 65536.0) -> None:
        if rate <= 0:
            raise ValueError(f"link rate must be positive bytes/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def reserve(self, nbytes: int, not_before: float | None = None) -> float:
        """Book ``nbytes`` starting no earlier than ``not_before``; returns the finish time (monotonic)."""
        start = time.monotonic() if not_before is None else not_before
        if start > self._stamp:
            self._tokens = min(self.burst, self._tokens + (start - self._stamp) * self.rate)
            self._stamp = start
        self._tokens -= nbytes
        if self._tokens >= 0:
            return start
        return self._stamp + (-self._tokens) / self.rate


class LinkModel:
    """Interface of a peer's view of the network. ``tag`` names this peer in latency tables."""

    shaped: bool = False
    tag: str = ""

    def delay(self, src: str, dst: str, nbytes: int) -> float:
        """One-way propagation delay (seconds) of a frame of ``nbytes`` from ``src`` to ``dst``."""
        return 0.0

    def drop(self, src: str, dst: str) -> bool:
        """Whether a message from ``src`` to ``dst`` is lost."""
        return False

    def uplink(self, nbytes: int) -> float:
        """Book ``nbytes`` on this peer's uplink; returns the monotonic time they have left."""
        return 0.0

    def arrival(self, src: str, sent_at: float, nbytes: int) -> float:
        """Monotonic time at which a frame stamped ``sent_at`` by ``src`` is delivered here."""
        return 0.0


class IdentityLinks(LinkModel):
    """Real deployment: the network is whatever it is; nothing is added."""


class ShapedLinks(LinkModel):
    """Simulated links: latency (+ uniform jitter), uplink/downlink bandwidth, loss; all seeded.

    Args:
        tag: this peer's name in the latency table.
        latency: seconds, as one number, a ``{(src, dst): seconds}`` mapping (missing pairs fall back
            to ``default_latency``; a pair given one way only is used both ways) or a function.
        jitter: extra delay drawn uniformly from ``[0, jitter)`` for every frame.
        uplink, downlink: bytes/s of this peer's links; ``None`` is unlimited.
        loss: probability that a message is dropped.
    Partitions are mutable at run time: ``blocked`` holds pairs of tags that cannot reach each other,
    ``sides`` maps tags to a side number (absent = side 0) and drops traffic between different sides.
    """

    shaped = True

    def __init__(
        self,
        tag: str,
        latency: LatencySpec = 0.0,
        *,
        jitter: float = 0.0,
        uplink: float | None = None,
        downlink: float | None = None,
        loss: float = 0.0,
        default_latency: float = 0.0,
        seed: int = 0,
        burst: float = 65536.0,
    ) -> None:
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be a probability in [0, 1], got {loss}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0 seconds, got {jitter}")
        self.tag = tag
        self.jitter = float(jitter)
        self.loss = float(loss)
        self.default_latency = float(default_latency)
        self.blocked: set[frozenset[str]] = set()
        self.sides: dict[str, int] = {}
        self._latency = latency
        self._rng = random.Random(f"{seed}:{tag}")
        self._up = TokenBucket(uplink, burst) if uplink else None
        self._down = TokenBucket(downlink, burst) if downlink else None

    def base_latency(self, src: str, dst: str) -> float:
        spec = self._latency
        if callable(spec):
            return float(spec(src, dst))
        if isinstance(spec, Mapping):
            if (src, dst) in spec:
                return float(spec[(src, dst)])
            return float(spec.get((dst, src), self.default_latency))
        return float(spec)

    def delay(self, src: str, dst: str, nbytes: int) -> float:
        extra = self._rng.random() * self.jitter if self.jitter else 0.0
        return self.base_latency(src, dst) + extra

    def drop(self, src: str, dst: str) -> bool:
        if self.sides and self.sides.get(src, 0) != self.sides.get(dst, 0):
            return True
        if self.blocked and frozenset((src, dst)) in self.blocked:
            return True
        return self.loss > 0 and self._rng.random() < self.loss

    def uplink(self, nbytes: int) -> float:
        return self._up.reserve(nbytes) if self._up else 0.0

    def arrival(self, src: str, sent_at: float, nbytes: int) -> float:
        reach = sent_at + self.delay(src, self.tag, nbytes)
        return self._down.reserve(nbytes, reach) if self._down else reach
