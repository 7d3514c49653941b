"""The Moshpit averaging study with the real networked protocol (Moshpit SGD paper, Table 1 / Figure).

Every peer holds a scalar drawn from N(0, 1). Rounds start at fixed wall-clock times that the peer of
rank 0 publishes in the DHT (``t0 + k * period``), so all peers agree on them without a coordinator
process. In each round every peer independently sits out with probability ``p`` (it keeps its value);
the others run one real :meth:`AveragerCore.step` — DHT matchmaking and the all-reduce over ZeroMQ — with
matchmaking ending at ``round start + matchmaking * period``. After every round each peer records its
value; ``analysis/moshpit_averaging.py`` turns them into the mean squared distance to the mean.

Methods (run one after another, on the same initial values per restart):

* ``moshpit``: peers placed once at random on an ``M ** d`` grid; group keys are grid lines, rotated
  after each round by the member's index in the group (hivesim's Moshpit keys);
* ``random``: each round a fresh random split of all peers into groups of ``M`` (a shared seeded
  permutation), so a skipping peer leaves its group smaller — the paper re-splits the live peers instead;
* ``allreduce``: one group of all N peers that needs every peer (``min_group_size = N``), so it averages
  exactly in rounds where nobody sits out, and not at all otherwise.

Peers are ranked 0..N-1 by ``population`` (``{group: count}`` in order; default: the index in the
peer's name), which places them on the grid.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from hivesim.averaging.averager import AveragerCore
from hivesim.averaging.grid import GroupKeyManager, grid_manager, index_bits
from hivesim.dht.storage import get_dht_time
from hivesim.roles import Role

METHODS = ("moshpit", "random", "allreduce")
SCHEDULE_KEY = "moshpit_study.schedule"


class MoshpitAveraging(Role):
    name = "moshpit_averaging"

    def __init__(self, peer: Any, side: int = 4, dims: int = 2, p: float = 0.0, rounds: int = 5, restarts: int = 3,
                 period: float = 1.0, matchmaking: float = 0.6, warmup: float = 3.0, seed: int = 0,
                 methods: list[str] | tuple[str, ...] = METHODS, population: dict[str, int] | None = None) -> None:
        super().__init__(peer)
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"moshpit_averaging: unknown methods {sorted(unknown)} (known: {', '.join(METHODS)})")
        if not 0 <= p < 1 or not 0 < matchmaking < 1:
            raise ValueError("moshpit_averaging: need 0 <= p < 1 and 0 < matchmaking < 1")
        self.side, self.dims, self.p = side, dims, p
        self.n = side ** dims
        self.rounds, self.restarts, self.period = rounds, restarts, period
        self.matchmaking, self.warmup, self.seed = matchmaking, warmup, seed
        self.methods = list(methods)
        self.rank = _rank(peer.name, population)
        if not 0 <= self.rank < self.n:
            raise ValueError(f"moshpit_averaging: peer {peer.name} has rank {self.rank}, outside the {side}^{dims} grid")
        self.value = torch.zeros(1)
        self.core: AveragerCore | None = None
        self.done_rounds = 0
        self.state = "waiting"

    async def start(self) -> None:
        self.peer.spawn(self._run(), name="moshpit_averaging.run")

    async def stop(self) -> None:
        if self.core is not None:
            await self.core.close()

    async def _schedule(self) -> float:
        """The wall time of round 0, published by rank 0 and read by everyone else."""
        dht = self.peer.dht
        if self.rank == 0:
            t0 = get_dht_time() + self.warmup
            for _ in range(5):
                if await dht.store(SCHEDULE_KEY, t0, t0 + 3600):
                    break
                await asyncio.sleep(0.2)
            return t0
        while True:
            found = await dht.get(SCHEDULE_KEY, latest=True)
            if found is not None and isinstance(found.value, (int, float)):
                return float(found.value)
            await asyncio.sleep(0.2)

    async def _run(self) -> None:
        t0 = await self._schedule()
        index = 0
        for method in self.methods:
            for restart in range(self.restarts):
                await self._phase(method, restart, t0 + index * (self.rounds + 1) * self.period)
                index += 1
        self.state = "done"

    async def _phase(self, method: str, restart: int, start: float) -> None:
        """One restart of one method: draw values, then ``rounds`` scheduled rounds."""
        await _sleep_until(start)
        rng = np.random.default_rng([self.seed, restart, self.rank])
        self.value = torch.tensor([float(rng.standard_normal())], dtype=torch.float32)
        prefix = f"{method}{restart}"
        target = self.n if method == "allreduce" else self.side
        core = AveragerCore(self.peer.endpoint, self.peer.dht, [self.value], prefix=prefix, target_group_size=target,
                            min_group_size=target if method == "allreduce" else 2,
                            allreduce_timeout=max(0.5, 0.8 * (1 - self.matchmaking) * self.period), request_timeout=1.0,
                            ban_time=self.period * 2, merge_when_alone=False, early_start=False)
        if method == "moshpit":
            placement = np.random.default_rng([self.seed, restart, 7]).permutation(self.n)
            core.keys = grid_manager(prefix, int(placement[self.rank]), self.side, self.dims)
        self.core = await core.start()
        self._record(method, restart, 0, skipped=False, group=0)
        try:
            for r in range(1, self.rounds + 1):
                round_start = start + r * self.period
                await _sleep_until(round_start - self.period * 0.95)  # just after the previous round's window
                if method == "random":
                    core.keys = _random_key(prefix, self.seed, restart, r, self.rank, self.n, self.side)
                skip = np.random.default_rng([self.seed, restart, r, self.rank, 1]).random() < self.p
                await _sleep_until(round_start)
                group = 0
                if skip:
                    core.skip_round()
                else:
                    deadline = round_start + self.matchmaking * self.period
                    try:
                        result = await asyncio.wait_for(core.step(deadline=deadline),
                                                        timeout=max(0.1, round_start + 0.98 * self.period - get_dht_time()))
                    except asyncio.TimeoutError:
                        result = None
                        self.peer.metrics.count("moshpit_step_timeouts")
                    group = 0 if result is None else result.group_size
                with core.get_tensors() as (value,):
                    self.value = value.clone()
                self._record(method, restart, r, skipped=skip, group=group)
                self.done_rounds += 1
        finally:
            await core.close()

    def _record(self, method: str, restart: int, r: int, *, skipped: bool, group: int) -> None:
        self.peer.metrics.sample("moshpit_value", float(self.value.item()), method=method, restart=restart, round=r,
                                 skipped=skipped, group=group, rank=self.rank)

    def status(self) -> dict[str, Any]:
        return {"rounds": self.done_rounds, "state": self.state}


ROLE = MoshpitAveraging


async def _sleep_until(wall: float) -> None:
    delay = wall - get_dht_time()
    if delay > 0:
        await asyncio.sleep(delay)


def _rank(name: str, population: dict[str, int] | None) -> int:
    group, _, index = name.rpartition(".")
    if not index.isdigit():
        raise ValueError(f"moshpit_averaging: cannot rank peer {name!r} (expected group.index)")
    if not population:
        return int(index)
    offset = 0
    for g, count in population.items():
        if g == group:
            return offset + int(index)
        offset += int(count)
    raise ValueError(f"moshpit_averaging: group {group!r} is not in population {list(population)}")


def _random_key(prefix: str, seed: int, restart: int, r: int, rank: int, n: int, side: int) -> GroupKeyManager:
    """This round's random group: a permutation of all ranks shared by every peer (same seed), cut in groups."""
    permutation = np.random.default_rng([seed, restart, r, 3]).permutation(n)
    groups = max(1, n // side)
    width = max(1, math.ceil(math.log2(groups))) if groups > 1 else 0
    bucket = int(np.where(permutation == rank)[0][0]) // side
    return GroupKeyManager(prefix, index_bits(bucket, width))


# ------------------------------------------------------------------------------------------------ results

def curves(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: the MSE to the mean after each round (mean over restarts), rounds to 1e-9 and 1e-4.

    The MSE of a restart's round is the mean squared distance of the values reported in that round to
    their mean (= the paper's metric when nobody leaves: averaging conserves the mean); with churn it is
    the disagreement among the peers still alive, and ``bias`` tells how far their mean moved.
    """
    table: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for s in samples:
        if s.get("name") == "moshpit_value":
            table[(s["method"], s["restart"], s["round"])].append(float(s["value"]))
    out: dict[str, dict[str, Any]] = {}
    for method in sorted({k[0] for k in table}, key=lambda m: METHODS.index(m) if m in METHODS else 9):
        restarts = sorted({k[1] for k in table if k[0] == method})
        rounds = sorted({k[2] for k in table if k[0] == method})
        per_restart, to_1e9, to_1e4, bias = [], [], [], []
        for restart in restarts:
            first = np.array(table.get((method, restart, 0), [np.nan]), dtype=np.float64)
            series = []
            for r in rounds:
                values = np.array(table.get((method, restart, r), []), dtype=np.float64)
                series.append(float(np.mean((values - values.mean()) ** 2)) if values.size else np.nan)
            last = np.array(table.get((method, restart, rounds[-1]), []), dtype=np.float64)
            if last.size and first.size:
                bias.append(abs(float(last.mean() - first.mean())))
            per_restart.append(series)
            to_1e9.append(_rounds_to(series, 1e-9))
            to_1e4.append(_rounds_to(series, 1e-4))
        mse = np.nanmean(np.array(per_restart, dtype=np.float64), axis=0)
        peers = [len(table.get((method, restarts[0], r), [])) for r in rounds]
        out[method] = {
            "rounds": rounds, "mse": [float(x) for x in mse], "restarts": len(restarts),
            "rounds_to_1e-9": _mean_rounds(to_1e9), "rounds_to_1e-4": _mean_rounds(to_1e4),
            "reached_1e-9": sum(x is not None for x in to_1e9), "peers_reporting": peers,
            "mean_shift": round(float(np.mean(bias)), 9) if bias else None,
        }
    return out


def _rounds_to(series: list[float], level: float) -> int | None:
    for r, v in enumerate(series):
        if v == v and v < level:
            return r
    return None


def _mean_rounds(values: list[int | None]) -> float | None:
    got = [v for v in values if v is not None]
    return round(float(np.mean(got)), 2) if got and len(got) == len(values) else None


def summarize(run: Any) -> dict[str, Any]:
    topology = run.topology
    params = topology.workload.params
    result = curves(run.samples)
    return {"n_peers": sum(g.count for g in topology.groups.values()), "side": params.get("side", 4),
            "dims": params.get("dims", 2), "p": params.get("p", 0.0),
            "step_timeouts": sum(p["counters"].get("moshpit_step_timeouts", 0) for p in run.peers),
            "methods": result}


def headline(run: Any) -> str:
    recent = [s for s in run.samples if s.get("name") == "moshpit_value" and s["t"] > time.time() - 5]
    if not recent:
        return "moshpit: waiting for the first round"
    last = recent[-1]
    values = np.array([s["value"] for s in recent if (s["method"], s["restart"], s["round"]) ==
                       (last["method"], last["restart"], last["round"])])
    return f"{last['method']} restart {last['restart']} round {last['round']}: mse {np.mean((values - values.mean()) ** 2):.2e}"
