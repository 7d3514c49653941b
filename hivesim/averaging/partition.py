"""Load balancing of a butterfly all-reduce: how much of the vector each member reduces.

The DeDLOC paper's linear program: with G members of throughputs b_i, a member that reduces a share w_i
of the vector moves about (1 + (G - 2) * w_i) vector-lengths (it sends every other part once, receives
G - 1 copies of its own part and sends G - 1 averages back), so the slowest member needs
max_i (1 + (G - 2) w_i) / b_i. Minimise that subject to sum(w) = 1, w >= 0, and w_i = 0 for members
that cannot serve (client mode, behind NAT).

Throughputs are what members *declare*; a member that declares 1e300 would be handed the whole vector to
reduce. So declarations are clamped to ``MAX_THROUGHPUT_RATIO`` times the group's median before the LP:
honest heterogeneity (a 10 Gbit/s server beside 100 Mbit/s volunteers) survives, a lie buys at most that.
The LP alone still hands everything to a member 4x faster than the rest, so in groups
(:func:`group_shares`) no member reduces more than ``DEFAULT_MAX_SHARE`` of the vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import linprog

MAX_THROUGHPUT_RATIO = 16.0  # most a declared throughput may exceed the group's median by
# the largest share of a round one member reduces by default: a member that lies about its bandwidth (and
# then about its part's average) decides at most this much of the vector; trusted swarms may pass 1.0 for
# DeDLOC's unconstrained balancing
DEFAULT_MAX_SHARE = 0.5


def clamp_throughputs(throughputs: Sequence[float], ratio: float = MAX_THROUGHPUT_RATIO) -> np.ndarray:
    """Declared throughputs bounded to ``[median / ratio, median * ratio]`` (non-finite ones: the median)."""
    b = np.asarray(throughputs, dtype=np.float64)
    finite = np.isfinite(b) & (b > 0)
    if not finite.any():
        return np.ones_like(b)
    median = float(np.median(b[finite]))
    b = np.where(finite, b, median)
    return np.clip(b, median / ratio, median * ratio)


def optimal_shares(throughputs: Sequence[float], can_reduce: Sequence[bool], max_share: float | None = None) -> np.ndarray:
    """Shares ``w`` (summing to 1) that minimise the slowest member's transfer time, each at most
    ``max_share`` (raised to one fair share of the members that can reduce, so the program stays feasible).

    Raises ValueError when no member can reduce (a group of clients only cannot average).
    """
    b = np.asarray(throughputs, dtype=np.float64)
    able = np.asarray(can_reduce, dtype=bool)
    if b.shape != able.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError("throughputs and can_reduce must be equally long, non-empty lists")
    if not able.any():
        raise ValueError("no member of the group can reduce a part (all are clients)")
    if np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise ValueError(f"throughputs must be positive and finite, got {list(b)}")
    b = clamp_throughputs(b)
    cap = 1.0 if max_share is None else min(1.0, max(float(max_share), 1.0 / int(able.sum())))
    if len(b) <= 2 or able.sum() == 1:
        # (G - 2) = 0: every split costs the same; split by throughput among those able to reduce
        return _capped(_proportional(b, able), able, cap)
    return _lp(b, able, cap)


def _proportional(b: np.ndarray, able: np.ndarray) -> np.ndarray:
    w = np.where(able, b, 0.0)
    return w / w.sum()


def _capped(w: np.ndarray, able: np.ndarray, cap: float) -> np.ndarray:
    """Move share above ``cap`` to the members below it, in proportion to their shares (water filling)."""
    w = w.copy()
    for _ in range(len(w)):
        over = w > cap + 1e-12
        if not over.any():
            break
        excess = float((w[over] - cap).sum())
        w[over] = cap
        room = able & (w < cap - 1e-12)
        w[room] += excess * w[room] / w[room].sum()
    return w / w.sum()


def _lp(b: np.ndarray, able: np.ndarray, cap: float) -> np.ndarray:
    group = len(b)
    b = b / b.max()  # scale-free: keeps the LP well conditioned for bytes/s given in any unit
    # variables: w_1..w_G, t. minimise t s.t. (G-2)/b_i * w_i - t <= -1/b_i; sum w = 1; 0 <= w_i (<= 0 if client)
    # Ties (the slowest members often fix t whatever the others do) go to the faster members: a tiny
    # secondary cost on each member's own time makes the solution unique and sensible.
    c = np.zeros(group + 1)
    c[:group] = 1e-4 * (group - 2) / b / group
    c[-1] = 1.0
    a_ub = np.zeros((group, group + 1))
    a_ub[np.arange(group), np.arange(group)] = (group - 2) / b
    a_ub[:, -1] = -1.0
    b_ub = -1.0 / b
    a_eq = np.zeros((1, group + 1))
    a_eq[0, :group] = 1.0
    bounds = [(0.0, cap if ok else 0.0) for ok in able] + [(0.0, None)]
    result = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=[1.0], bounds=bounds, method="highs")
    if not result.success:  # cannot happen for a feasible program; fall back to proportional shares
        return _capped(_proportional(b, able), able, cap)
    w = np.clip(result.x[:group], 0.0, None)
    return w / w.sum()


def part_sizes(total: int, shares: Sequence[float]) -> list[int]:
    """Round shares of ``total`` elements to integers that sum to ``total`` (largest remainders first);
    a member with share 0 gets 0 elements."""
    w = np.asarray(shares, dtype=np.float64)
    exact = w * total
    sizes = np.floor(exact).astype(np.int64)
    left = int(total - sizes.sum())
    if left > 0:
        order = np.argsort(-(exact - sizes), kind="stable")
        order = [i for i in order if w[i] > 0] or list(order)
        for i in order[:left]:
            sizes[i] += 1
    return [int(s) for s in sizes]


def load_balance(total: int, throughputs: Sequence[float], can_reduce: Sequence[bool],
                 max_share: float | None = None) -> list[int]:
    """Element counts per member for a vector of ``total`` elements (see :func:`optimal_shares`)."""
    return part_sizes(total, optimal_shares(throughputs, can_reduce, max_share))


def group_shares(members: Sequence[dict], max_share: float | None = DEFAULT_MAX_SHARE) -> list[float]:
    """The shares of an assembled group, from its members' declared ``bw`` and ``client`` flags.

    Every member computes them itself (deterministically, from the member list they all hold), so neither
    a leader nor a member lying about its bandwidth decides who reduces what beyond the clamp and the cap.
    """
    return [float(s) for s in optimal_shares([float(m["bw"]) for m in members],
                                             [not m.get("client") for m in members], max_share)]


def transfer_time(shares: Sequence[float], throughputs: Sequence[float]) -> float:
    """The LP's objective: the slowest member's time, in vector-lengths / throughput unit."""
    w, b = np.asarray(shares, dtype=np.float64), np.asarray(throughputs, dtype=np.float64)
    return float(np.max((1 + (len(w) - 2) * w) / b))
