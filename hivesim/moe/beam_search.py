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

Two shapes: on an async :class:`~hivesim.dht.DHTNode` (inside a peer's event loop) ``await
searcher.find_best_experts(batch_scores, k)`` gives :class:`FoundExpert` lists; on the blocking
:class:`~hivesim.DHT` facade, ``MoEBeamSearcher(dht, "expert.", grid_size)`` is hivemind's synchronous API
(:class:`BlockingMoEBeamSearcher`: ``find_best_experts`` for one sample, ``batch_find_best_experts``, both
returning :class:`~hivesim.moe.RemoteExpert` objects), and :func:`get_experts` looks experts up by uid.
Both run the same search (the blocking one submits the async one to the DHT's loop).
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
from hivesim.moe.uids import UID_DELIMITER, make_uid, parse_uid, prefix_key, read_declarations


@dataclass(frozen=True)
class FoundExpert:
    uid: str
    address: str
    coords: tuple[int, ...]
    score: float


def _is_blocking_dht(dht: Any) -> bool:
    from hivesim.dht.facade import DHT

    return isinstance(dht, DHT)


class MoEBeamSearcher:
    """Best-first search over the DHT declarations of one grid.

    Given the blocking :class:`~hivesim.DHT` facade instead of a node, the constructor returns a
    :class:`BlockingMoEBeamSearcher` (hivemind's synchronous API over this same search).

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

    def __new__(cls, dht_node: Any, *args: Any, **kwargs: Any) -> Any:
        if cls is MoEBeamSearcher and _is_blocking_dht(dht_node):
            return BlockingMoEBeamSearcher(dht_node, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, dht_node: Any, uid_prefix: str, grid_size: Sequence[int], *, cache_ttl: float = 2.0,
                 negative_ttl: float = 0.5, max_rounds: int = 64, latest: bool = True,
                 allowed_owners: Sequence[bytes] | None = None) -> None:
        self.node = dht_node
        self.uid_prefix = _bare_prefix(uid_prefix)
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


def _bare_prefix(uid_prefix: str) -> str:
    """hivemind writes grid prefixes with their delimiter (``"expert."``); hivesim without (``"expert"``)."""
    if not isinstance(uid_prefix, str) or not uid_prefix.strip(UID_DELIMITER):
        raise ValueError(f"uid_prefix must be a name such as 'expert' (or hivemind's 'expert.'), got {uid_prefix!r}")
    return uid_prefix[:-1] if uid_prefix.endswith(UID_DELIMITER) else uid_prefix


def _scores_2d(scores: Any) -> np.ndarray:
    array = scores.detach().cpu().numpy() if hasattr(scores, "detach") else np.asarray(scores)
    return np.asarray(array, dtype=np.float64)


class BlockingMoEBeamSearcher:
    """hivemind's ``MoEBeamSearcher`` on the blocking :class:`~hivesim.DHT`: what ``MoEBeamSearcher(dht,
    uid_prefix, grid_size)`` returns for a facade. Every call runs :class:`MoEBeamSearcher`'s async search in
    the DHT's event loop and waits (or returns a ``concurrent.futures.Future`` with ``return_future=True``).

    Args:
        dht: a running :class:`~hivesim.DHT`; the experts it returns make their calls through its endpoint.
        uid_prefix: ``"expert."`` (hivemind's spelling) or ``"expert"``.
        grid_size: the grid's shape, e.g. ``(32, 32)``.
        **kwargs: :class:`MoEBeamSearcher`'s (``cache_ttl``, ``negative_ttl``, ``max_rounds``, ``latest``).
    """

    def __init__(self, dht: Any, uid_prefix: str, grid_size: Sequence[int], **kwargs: Any) -> None:
        self.dht = dht
        self.searcher = MoEBeamSearcher(dht.node, uid_prefix, grid_size, **kwargs)
        self.uid_prefix = self.searcher.uid_prefix
        self.grid_size = self.searcher.grid_size

    def find_best_experts(self, grid_scores: Sequence[Any], beam_size: int, return_future: bool = False) -> Any:
        """The up to ``beam_size`` best alive experts for one sample, best first, as ``RemoteExpert`` objects.
        ``grid_scores``: one 1-D tensor (or array) of scores per grid dimension."""
        rows = [_scores_2d(s).reshape(1, -1) for s in grid_scores]

        async def search(_dht: Any, node: Any) -> list:
            return _remote((await self.searcher.find_best_experts(rows, beam_size))[0], node)

        return self.dht.run_coroutine(search, return_future)

    def batch_find_best_experts(self, batch_grid_scores: Sequence[Any], beam_size: int,
                                return_future: bool = False) -> Any:
        """For each sample, the up to ``beam_size`` best alive experts; ``batch_grid_scores``: one
        ``[batch, grid_size[i]]`` tensor per grid dimension."""
        rows = [_scores_2d(s) for s in batch_grid_scores]

        async def search(_dht: Any, node: Any) -> list:
            return [_remote(found, node) for found in await self.searcher.find_best_experts(rows, beam_size)]

        return self.dht.run_coroutine(search, return_future)

    def ban(self, uid: str, seconds: float) -> None:
        self.searcher.ban(uid, seconds)


def _remote(found: Sequence[FoundExpert], node: Any) -> list:
    """``RemoteExpert`` objects for search results; built inside the node's loop, so they call through it."""
    from hivesim.moe.remote import RemoteExpert

    return [RemoteExpert(f.uid, f.address, endpoint=node.endpoint) for f in found]


async def find_experts(node: Any, uids: Sequence[str], latest: bool = True) -> dict[str, str | None]:
    """``{uid: server address, or None}`` for experts declared alive in the DHT (async, on a ``DHTNode``):
    one lookup per parent prefix (``ffn.3.`` holds every ``ffn.3.*``)."""
    parsed = {uid: parse_uid(uid) for uid in uids}
    keys = sorted({prefix_key(prefix, coords[:-1]) for prefix, coords in parsed.values()})
    found = await node.get_many(keys, latest=latest) if keys else {}
    now = get_dht_time()
    out: dict[str, str | None] = {}
    for uid, (prefix, coords) in parsed.items():
        entry = found.get(prefix_key(prefix, coords[:-1]))
        # owned declarations only (see read_declarations): live ones, each from its server's own key
        value = read_declarations(entry.value if entry is not None else None, now).get(coords[-1])
        out[uid] = value if isinstance(value, str) else None
    return out


def get_experts(dht: Any, uids: Sequence[str], expiration_time: float | None = None,
                return_future: bool = False) -> Any:
    """hivemind's ``get_experts``: a ``RemoteExpert`` for each uid declared alive, None for the others, in
    order (blocking :class:`~hivesim.DHT`; ``return_future=True``: a ``concurrent.futures.Future``).
    ``expiration_time`` is accepted for hivemind's signature and ignored: a declaration counts while it lives."""
    uids = list(uids)
    for uid in uids:
        parse_uid(uid)  # a malformed uid is the caller's error, raised here rather than in the DHT's loop

    async def look_up(_dht: Any, node: Any) -> list:
        addresses = await find_experts(node, uids)
        from hivesim.moe.remote import RemoteExpert

        return [None if addresses[uid] is None else RemoteExpert(uid, addresses[uid], endpoint=node.endpoint)
                for uid in uids]

    return dht.run_coroutine(look_up, return_future)
