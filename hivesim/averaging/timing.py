"""Deadlines that adapt to what the swarm measures, unless the user fixed them.

Fixed matchmaking and all-reduce timeouts are hard to guess for a given swarm: too short and groups
never form or rounds are cut, too long and a dead peer stalls everyone. :class:`AdaptiveDeadline` keeps
an exponential moving average of the measured durations and allows ``factor`` times that plus a margin,
between a floor and a ceiling; an explicit value switches adaptation off.
"""

from __future__ import annotations


class AdaptiveDeadline:
    """``value`` = explicit, or clamp(factor * EMA(observed) + margin, floor, ceiling).

    Args:
        explicit: a fixed value in seconds (no adaptation) or None.
        initial: the value before anything was observed.
        factor, margin: head room over the typical duration.
        floor, ceiling: bounds of the adapted value.
        smoothing: weight of a new observation in the moving average.
    """

    def __init__(self, explicit: float | None = None, *, initial: float = 5.0, factor: float = 3.0, margin: float = 0.5,
                 floor: float = 0.5, ceiling: float = 60.0, smoothing: float = 0.3) -> None:
        if explicit is not None and explicit <= 0:
            raise ValueError(f"a deadline must be positive seconds, got {explicit}")
        self.explicit = explicit
        self.initial = initial
        self.factor = factor
        self.margin = margin
        self.floor = floor
        self.ceiling = ceiling
        self.smoothing = smoothing
        self.average: float | None = None
        self.observations = 0

    def observe(self, seconds: float) -> None:
        """Record one measured duration."""
        if seconds < 0:
            return
        self.observations += 1
        self.average = seconds if self.average is None else (1 - self.smoothing) * self.average + self.smoothing * seconds

    @property
    def value(self) -> float:
        if self.explicit is not None:
            return self.explicit
        if self.average is None:
            return self.initial
        return min(self.ceiling, max(self.floor, self.factor * self.average + self.margin))

    def __repr__(self) -> str:
        mode = "fixed" if self.explicit is not None else f"adaptive, {self.observations} observations"
        return f"AdaptiveDeadline({self.value:.3g} s, {mode})"
