"""How a reducer combines the contributions to its part: the mean, or a Byzantine-robust aggregate.

With the mean, one member decides what every honest member ends with (send ``1e30``, or the honest
mean's negation times the group size). The robust rules bound what ``b`` hostile members out of ``n``
can do to each part:

* ``centered_clip`` (Karimireddy, He & Jaggi 2021; used per part in BTARD, Gorbunov et al., "Secure
  Distributed Training at Scale", ICML 2022): start from a robust centre ``v`` and iterate
  ``v <- v + sum_i w_i (x_i - v) min(1, tau / |x_i - v|) / sum_i w_i``. Each contribution moves the centre by
  at most ``tau * w_i / sum w``, so ``b`` attackers move it by at most ``tau * b / n`` per iteration (equal
  weights), whatever they send. With ``tau=None`` the radius adapts: the median distance of the
  contributions to the starting centre (the coordinate-wise median), which keeps the rule scale-free.
  Known limits: attackers that stay within ``tau`` of the centre every round and push the same way
  ("a little is enough", Baruch et al. 2019) accumulate a bias over rounds, and "Byzantines can also
  learn from history" (Karimireddy et al. 2021) shows that without momentum on the honest side such
  small consistent pushes defeat any per-round rule; BTARD adds verification for that.
* ``trimmed_mean``: per coordinate, drop the ``trim`` fraction of largest and of smallest values, average
  the rest. Tolerates fewer than ``trim * n`` attackers per coordinate; ignores weights.
* ``median``: the coordinate-wise median; tolerates fewer than ``n / 2`` attackers; ignores weights and
  is the noisiest of the three.

All rules see only finite contributions of the right shape (the all-reduce refuses the rest) and run
off the event loop for big parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

AGGREGATIONS = ("mean", "centered_clip", "trimmed_mean", "median")


@dataclass(frozen=True)
class Aggregation:
    """Which rule a reducer uses, and its parameters."""

    rule: str = "mean"
    tau: float | None = None  # centered_clip: clipping radius (None: adaptive, see the module docstring)
    iterations: int = 5  # centered_clip: clipping iterations
    trim: float = 0.2  # trimmed_mean: fraction dropped at each end

    def __post_init__(self) -> None:
        if self.rule not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {self.rule!r}")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a positive number or None, got {self.tau!r}")
        if not 1 <= self.iterations <= 1000:
            raise ValueError(f"iterations must be in 1..1000, got {self.iterations!r}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim!r}")

    @property
    def robust(self) -> bool:
        return self.rule != "mean"

    @classmethod
    def of(cls, value: "str | Aggregation | None") -> "Aggregation":
        """``"centered_clip"``, an :class:`Aggregation`, or None (the mean)."""
        if value is None:
            return cls()
        if isinstance(value, Aggregation):
            return value
        if isinstance(value, str):
            return cls(value)
        raise TypeError(f"aggregation must be a name or an Aggregation, got {type(value).__name__}")


def aggregate(contributions: torch.Tensor, weights: torch.Tensor, spec: Aggregation) -> torch.Tensor:
    """Combine ``contributions`` (``[n, d]`` float32) with non-negative ``weights`` (``[n]``) by ``spec``."""
    if contributions.dim() != 2 or weights.shape != (contributions.shape[0],):
        raise ValueError("contributions must be [n, d] and weights [n]")
    n = contributions.shape[0]
    if n == 0:
        raise ValueError("nothing to aggregate")
    if spec.rule == "mean" or n == 1:
        total = float(weights.sum())
        if total <= 0:
            raise ValueError("every contribution has weight 0")
        return (weights[:, None] * contributions).sum(0) / total
    if spec.rule == "median":
        return contributions.median(dim=0).values
    if spec.rule == "trimmed_mean":
        k = int(spec.trim * n)
        if k == 0:
            return contributions.mean(0)
        ordered = contributions.sort(dim=0).values
        return ordered[k : n - k].mean(0)
    return centered_clip(contributions, weights, spec.tau, spec.iterations)


def centered_clip(x: torch.Tensor, weights: torch.Tensor, tau: float | None, iterations: int) -> torch.Tensor:
    """CenteredClip from the coordinate-wise median (see the module docstring)."""
    w = weights.to(x.dtype)
    total = float(w.sum())
    if total <= 0:
        w = torch.ones_like(w)
        total = float(w.sum())
    w = w / total
    v = x.median(dim=0).values
    if tau is None:
        tau = float((x - v).norm(dim=1).median())
        if tau == 0.0:
            return v  # most contributions agree exactly: that value is the centre
    for _ in range(iterations):
        diff = x - v
        dist = diff.norm(dim=1)
        scale = torch.clamp(tau / dist.clamp_min(1e-30), max=1.0)
        v = v + (w * scale)[:, None].mul(diff).sum(0)
    return v
