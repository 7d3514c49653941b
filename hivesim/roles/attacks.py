"""Byzantine trainers for robustness studies: what a hostile volunteer does to the gradients it sends.

A ``trainer`` with ``attack: NAME`` runs the honest protocol (it joins groups, reduces its parts honestly)
but corrupts what it contributes, which is the threat model of the robust-aggregation literature (a hostile
*reducer* is a different attack: see docs/security.md). Attackers of one run share a seed, so
they collude (the same direction, the same statistics). Each attack hooks in at two places of a step:
:meth:`Attack.batch` (before the forward pass) and :meth:`Attack.gradients` (after the backward pass).

* ``sign_flip``: the gradient times ``scale`` (default -1000).
* ``label_flip``: trains on ``num_classes - 1 - y`` (a data-poisoning attack: the gradients look plausible).
* ``random_direction``: a fixed random unit direction times ``scale`` (default 100) times the honest norm.
* ``alie`` ("a little is enough", Baruch et al. 2019): ``mean - z * std`` per coordinate of the attacker's
  estimate of the honest gradients (its own last ``history`` gradients), with ``z`` from the swarm size and
  attacker count: small enough per coordinate to pass clipping and trimming, consistent enough to bias.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

ATTACKS = ("sign_flip", "label_flip", "random_direction", "alie")


class Attack:
    """No-op hooks; subclasses corrupt the batch or the gradients."""

    def batch(self, batch: Any) -> Any:
        return batch

    def gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        pass


class SignFlip(Attack):
    def __init__(self, scale: float = -1000.0) -> None:
        self.scale = float(scale)

    def gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.scale)


class LabelFlip(Attack):
    def __init__(self, num_classes: int = 10) -> None:
        self.num_classes = int(num_classes)

    def batch(self, batch: Any) -> Any:
        x, y = batch
        return x, self.num_classes - 1 - y


class RandomDirection(Attack):
    def __init__(self, scale: float = 100.0, seed: int = 0) -> None:
        self.scale = float(scale)
        self.seed = seed
        self.direction: list[torch.Tensor] | None = None

    def gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if self.direction is None:
            gen = torch.Generator().manual_seed(self.seed)
            raw = [torch.randn(g.shape, generator=gen) for g in grads]
            norm = math.sqrt(sum(float(r.square().sum()) for r in raw))
            self.direction = [r / norm for r in raw]
        honest = math.sqrt(sum(float(g.square().sum()) for g in grads))
        for g, d in zip(grads, self.direction):
            g.copy_(d * (self.scale * honest))


class ALIE(Attack):
    def __init__(self, num_peers: int = 16, num_byzantine: int = 3, history: int = 8, z: float | None = None) -> None:
        if z is None:  # Baruch et al.: s = floor(n/2 + 1) - f supporters needed; z = Phi^-1((n - s) / n)
            s = num_peers // 2 + 1 - num_byzantine
            z = statistics.NormalDist().inv_cdf(max(0.5, min(0.99, (num_peers - s) / num_peers)))
        self.z = float(z)
        self.history: deque[list[torch.Tensor]] = deque(maxlen=max(2, history))

    def gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        self.history.append([g.detach().clone() for g in grads])
        if len(self.history) < 2:
            return  # nothing to estimate the spread from yet: send the honest gradient
        for i, g in enumerate(grads):
            stacked = torch.stack([h[i] for h in self.history])
            g.copy_(stacked.mean(0) - self.z * stacked.std(0))


def make_attack(name: str | None, **options: Any) -> Attack | None:
    """The attack called ``name`` (one of :data:`ATTACKS`), or None for an honest trainer."""
    if name is None:
        return None
    kinds = {"sign_flip": SignFlip, "label_flip": LabelFlip, "random_direction": RandomDirection, "alie": ALIE}
    if name not in kinds:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)} (or null), got {name!r}")
    try:
        return kinds[name](**options)
    except TypeError as e:
        raise ValueError(f"attack {name!r}: bad attack_opts: {e}") from None
