"""Finding the k best *alive* experts of a grid for each sample, through the DHT.

A gating network gives each sample one score per coordinate of every grid dimension; an expert's score
is the sum of its coordinates' scores. The search is best-first over grid prefixes, with an upper bound
``score(prefix) + sum of the best scores of the remaining dimensions``: a prefix's bound is never below
the score of any expert under it, so popping k complete experts in bound order yields exactly the k best
experts among those declared alive. All samples advance together in rounds, and one round's prefix
lookups go to the DHT as one ``get_many``. Prefix lookups are cached for ``cache_ttl`` seconds (empty
answers for ``negative_ttl``), so a batch of samples that share prefixes costs a handful of lookups, not one per sample.
Experts a caller saw fail can be banned for a while, so the search stops choosing a dead expert before its
declaration expires.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hivesim.dht.storage import get_dht_time
from hivesim.moe.uids import make_uid, prefix_key, read_declarations


@dataclass(frozen=True)
class FoundExpert:
    uid: str
    address: str
    coords: tuple[int, ...]
    score: float


class MoEBeamSearcher:
    """Best-first search over the DHT declarations of one grid.

    Args:
        dht_node: an async :class:`~hivesim.dht.DHTNode` (searches run in its event loop).
        uid_prefix: e.g. ``"ffn"``; experts are ``ffn.i.j``.
        grid_size: the grid's shape, e.g. ``(32, 32)``.
        cache_ttl: seconds a prefix lookup that found live children is reused.
        negative_ttl: seconds an empty answer is reused (short: a lookup may come back empty only because
            the network was slow, and a long negative cache would hide live experts).
        max_rounds: bound on search rounds (a guard; exactness needs ~ grid depth rounds).
        latest: merge every replica's subkeys for each prefix (default). A prefix key collects one subkey
            per server, and a replica that missed some servers' stores (e.g. it joined after them) would
            otherwise answer with a partial list: the search would then miss live experts.
        allowed_owners: if given, only declarations owned by these public keys count (see
            :func:`~hivesim.moe.uids.read_declarations`; unowned declarations never count).
    """

    def __init__(self, dht_node: Any, uid_prefix: str, grid_size: Sequence[int], *, cache_ttl: float = 2.0,
                 negative_ttl: float = 0.5, max_rounds: int = 64, latest: bool = True,
                 allowed_owners: Sequence[bytes] | None = None) -> None:
        self.node = dht_node
        self.uid_prefix = uid_prefix
        self.grid_size = tuple(int(g) for g in grid_size)
        self.cache_ttl = cache_ttl
        self.negative_ttl = min(negative_ttl, cache_ttl)
        self.max_rounds = max_rounds
        self.latest = latest
        self.allowed_owners = None if allowed_owners is None else frozenset(allowed_owners)
        self._first_owner: dict[str, dict[int, bytes]] = {}  # per prefix key: the owner each cell was read from
        self._cache: dict[str, tuple[float, dict[int, Any]]] = {}
        self._banned: dict[str, float] = {}
        self.lookups = 0  # prefix keys fetched from the DHT (cache misses)
        self.cache_hits = 0

    def ban(self, uid: str, seconds: float) -> None:
        """Skip ``uid`` for ``seconds`` (it just failed)."""
        self._banned[uid] = time.monotonic() + seconds

    def forget(self) -> None:
        """Drop the cache (e.g. after a test re-declared experts)."""
        self._cache.clear()

    async def _children(self, keys: list[str]) -> dict[str, dict[int, Any]]:
        now = time.monotonic()
        out: dict[str, dict[int, Any]] = {}
        missing = []
        for key in keys:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                out[key] = hit[1]
                self.cache_hits += 1
            else:
                missing.append(key)
        if missing:
            found = await self.node.get_many(missing, latest=self.latest)
            self.lookups += len(missing)
            now_dht = get_dht_time()
            for key in missing:
                entry = found.get(key)  # owned declarations only (see read_declarations)
                children = read_declarations(entry.value if entry is not None else None, now_dht,
                                             self.allowed_owners, self._first_owner.setdefault(key, {}))
                out[key] = children
                self._cache[key] = (time.monotonic() + (self.cache_ttl if children else self.negative_ttl), children)
        return out

    async def find_best_experts(self, grid_scores: Sequence[np.ndarray], k_best: int,
                                exclude_prob: float = 0.0, rng: random.Random | None = None) -> list[list[FoundExpert]]:
        """For each sample (row of the score arrays, one array ``[batch, grid_size[i]]`` per dimension),
        the up to ``k_best`` best alive experts, best first.

        ``exclude_prob`` hides each (sample, expert) pair with that probability before the top-k is taken,
        as if the expert were dead for that sample (the learning@home failure experiment)."""
        scores = [np.asarray(s, dtype=np.float64) for s in grid_scores]
        if len(scores) != len(self.grid_size) or any(s.shape[1] != g for s, g in zip(scores, self.grid_size)):
            raise ValueError(f"expected one score array per grid dimension {self.grid_size}, got "
                             f"{[tuple(s.shape) for s in scores]}")
        batch = scores[0].shape[0]
        depth = len(self.grid_size)
        best = np.stack([s.max(axis=1) for s in scores], axis=1)  # [batch, depth]
        rest = np.concatenate([np.cumsum(best[:, ::-1], axis=1)[:, ::-1], np.zeros((batch, 1))], axis=1)
        tie = itertools.count()
        rng = rng or random.Random()
        now = time.monotonic()
        banned = {uid for uid, until in self._banned.items() if until > now}
        if len(banned) != len(self._banned):
            self._banned = {u: t for u, t in self._banned.items() if t > now}
        # heap entries: (-bound, tiebreak, coords, partial score, address or None)
        heaps: list[list[tuple]] = [[(-rest[b, 0], next(tie), (), 0.0, None)] for b in range(batch)]
        found: list[list[FoundExpert]] = [[] for _ in range(batch)]
        for _ in range(self.max_rounds):
            expand: list[tuple[int, tuple[int, ...], float]] = []
            for b in range(batch):
                heap, need = heaps[b], k_best - len(found[b])
                popped = [heapq.heappop(heap) for _ in range(min(need, len(heap)))]
                blocked = False
                for entry in popped:
                    _, _, coords, partial, address = entry
                    if address is not None and not blocked:
                        found[b].append(FoundExpert(make_uid(self.uid_prefix, coords), address, coords, partial))
                    elif address is not None:
                        heapq.heappush(heap, entry)
                    else:
                        blocked = True
                        expand.append((b, coords, partial))
            if not expand:
                break
            keys = sorted({prefix_key(self.uid_prefix, coords) for _, coords, _ in expand})
            children = await self._children(keys)
            for b, coords, partial in expand:
                dim = len(coords)
                last = dim == depth - 1
                for coord, value in children[prefix_key(self.uid_prefix, coords)].items():
                    if not 0 <= coord < self.grid_size[dim]:
                        continue
                    child = coords + (coord,)
                    score = partial + scores[dim][b, coord]
                    if last:
                        if not isinstance(value, str):
                            continue
                        if banned and make_uid(self.uid_prefix, child) in banned:
                            continue
                        if exclude_prob and rng.random() < exclude_prob:
                            continue
                        heapq.heappush(heaps[b], (-score, next(tie), child, score, value))
                    else:
                        heapq.heappush(heaps[b], (-(score + rest[b, dim + 1]), next(tie), child, score, None))
        return found
