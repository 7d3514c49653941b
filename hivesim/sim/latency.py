"""The per-pair latency every simulated peer consults: small, picklable, no heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LatencyModel:
    """``latency(src, dst) = matrix[pos[src]][pos[dst]] * max(factor[src], factor[dst])``; picklable."""

    positions: dict[str, int]
    matrix: list[list[float]]
    factors: dict[str, float] = field(default_factory=dict)

    def __call__(self, src: str, dst: str) -> float:
        a, b = self.positions.get(src), self.positions.get(dst)
        if a is None or b is None:
            return 0.0
        factor = max(self.factors.get(src, 1.0), self.factors.get(dst, 1.0))
        return self.matrix[a][b] * factor
