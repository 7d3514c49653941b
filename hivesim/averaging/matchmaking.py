"""Matchmaking through the DHT: who averages with whom this round.

Every peer looking for a group declares itself under its group key (a DHT subkey per peer and search,
expiring at its deadline, and withdrawn when the search ends so that nobody waits for it), with its state:
looking, leading (it has followers) or following (taken). Peers are ranked by ``(deadline, peer id)``.
A peer without followers asks the others to lead it, leaders first, then best-ranked first; a peer
accepts a worse-ranked follower any time it is not itself joining someone, and a better-ranked one only
once it already leads a group. A peer that has followers joins nobody, except to hand its whole group
over to a better-ranked leader with room for it (two leaders under one key, one of which did not see the
other in time, would split its peers into two short groups), and a peer that is joining accepts nobody:
waits only go from worse- to better-ranked peers, so no two peers ever wait on each other. A candidate
that is following, full, or gone answers at once and is skipped.

A peer that finds itself alone under its key for a while looks under the sibling keys (as many bits)
and the root key (``{prefix}.0b``), and moves to the one where a group is short of members (of two lone
peers, the worse-ranked one moves to the better-ranked one, so they never swap keys), else to the root
key, where every lonely peer goes too: so the last stragglers of a swarm still find each other. One
that finds nobody under any key twice in a row ends its search instead of waiting out its window.

A leader starts the round when its group reaches ``target_group_size``, when every live peer ranked
below it under the key has joined it or is taken (leading or following someone else), or at its deadline
if it has at least ``min_group_size`` members.
It then picks a random group id and the load-balanced shares of the all-reduce; the members' order is a
permutation derived from the group id, so every member knows every index. Followers learn the group
through a long-polling ``await`` call to the leader, which also tells them at once when the leader
died. Every wait is bounded by the deadlines; peers that did not answer are banned for a while, so the
next round does not wait on them again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from hivesim.averaging.grid import member_order
from hivesim.averaging.partition import optimal_shares
from hivesim.averaging.timing import AdaptiveDeadline
from hivesim.dht.node import DHTNode
from hivesim.dht.storage import get_dht_time
from hivesim.dht.validation import owner_marker
from hivesim.net.identity import peer_id_from_public_key, verify_record
from hivesim.net.secure import address_peer_id
from hivesim.net.errors import PeerUnreachable, RPCError, RPCTimeout
from hivesim.net.rpc import CallContext, Endpoint

logger = logging.getLogger(__name__)

MAX_SIBLING_BITS = 4  # a lone peer reads the sibling keys of keys up to 4 bits (15 of them); beyond, the root only

# what a declaration says of its peer (its fifth field)
LOOKING, LEADING, FOLLOWING = 0, 1, 2

_OWNED_SUBKEY = re.compile(rb"\[owner:([0-9a-f]{64})\]$")


def declaration_owner(subkey: object) -> bytes | None:
    """The public key a declaration's subkey names (``<peer id><token>[owner:<key hex>]``), else None.

    Declarations are owned (signed by their writer), so nobody can publish one in another peer's name,
    and readers ignore any declaration whose peer id is not its owner's."""
    if not isinstance(subkey, bytes):
        return None
    match = _OWNED_SUBKEY.search(subkey)
    return bytes.fromhex(match.group(1).decode()) if match else None


class BadRequest(ValueError):
    """A malformed averaging request; the caller gets it back as a ``RemoteError``."""


@dataclass
class GroupInfo:
    """An assembled group, identical on every member (except ``my_index``)."""

    group_id: bytes
    key: str
    members: list[dict[str, Any]]  # in group order: {"id", "addr", "bw", "client", "aux", "gather"}
    shares: list[float]
    my_index: int
    formed_in: float = 0.0  # seconds from the start of the search to the start of the round
    bucket_size: int = 0  # live peers seen under the key (for adapting the key bits)

    @property
    def size(self) -> int:
        return len(self.members)

    def to_wire(self) -> dict[str, Any]:
        return {"gid": self.group_id, "key": self.key, "members": self.members, "shares": self.shares,
                "formed_in": self.formed_in}


class BanList:
    """Peers that failed recently, each until its own expiry (monotonic seconds)."""

    def __init__(self, ban_time: float) -> None:
        self.ban_time = ban_time
        self._until: dict[bytes, float] = {}

    def ban(self, peer_id: bytes) -> None:
        self._until[peer_id] = time.monotonic() + self.ban_time

    def __contains__(self, peer_id: bytes) -> bool:
        until = self._until.get(peer_id)
        if until is None:
            return False
        if until < time.monotonic():
            del self._until[peer_id]
            return False
        return True

    def __len__(self) -> int:
        return sum(1 for p in list(self._until) if p in self)


@dataclass
class _Search:
    key: str
    deadline: float  # DHT time
    rank: tuple[float, bytes]
    me: dict[str, Any]
    token: bytes = field(default_factory=lambda: os.urandom(12))
    started: float = field(default_factory=time.monotonic)
    followers: list[dict[str, Any]] = field(default_factory=list)
    joining: bool = False
    following: bool = False
    closed: bool = False
    group: GroupInfo | None = None
    outcome: asyncio.Future | None = None  # set when the leader starts the round (GroupInfo) or gives up (None)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    join_done: asyncio.Event = field(default_factory=asyncio.Event)  # set while no join request of ours is out
    bucket_size: int = 0
    stamp: int = 0  # declarations published so far: each later one must win in the DHT over the earlier ones
    # a better-ranked live peer is declared under the key and has not refused us: it should lead, so we do
    # not gather followers of our own yet (two leaders under one key split its peers into two short groups)
    defer_to_better: bool = False

    def __post_init__(self) -> None:
        self.join_done.set()


# what a member's ticket signs: everything others rely on about it in a round
_TICKET_FIELDS = ("id", "addr", "bw", "client", "aux", "w", "gather", "since")
TICKET_MAX_AGE = 600.0  # seconds a member's ticket stays valid (longer than any matchmaking window)


def _member_info(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise BadRequest("peer info must be a mapping")
    pid, addr, bw = payload.get("id"), payload.get("addr"), payload.get("bw")
    if not isinstance(pid, bytes) or not 1 <= len(pid) <= 64:
        raise BadRequest("peer info needs an id of 1..64 bytes")
    if not isinstance(addr, str) or len(addr) > 256:
        raise BadRequest("peer info needs an address string")
    if not isinstance(bw, (int, float)) or isinstance(bw, bool) or not math.isfinite(bw) or bw <= 0:
        raise BadRequest("peer info needs a positive bandwidth")
    weight, since = payload.get("w", 1.0), payload.get("since", 0.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
        raise BadRequest("peer info needs a finite non-negative weight")
    if not isinstance(since, (int, float)) or isinstance(since, bool) or not math.isfinite(since):
        raise BadRequest("peer info needs the time its ticket was made")
    info = {"id": pid, "addr": addr, "bw": float(bw), "client": bool(payload.get("client")),
            "aux": bool(payload.get("aux")), "gather": payload.get("gather"), "w": float(weight), "since": float(since)}
    pk, sig = payload.get("pk"), payload.get("sig")
    if pk is not None or sig is not None:
        if not isinstance(pk, bytes) or len(pk) != 32 or not isinstance(sig, bytes) or len(sig) != 64:
            raise BadRequest("a member ticket needs a 32-byte public key and a 64-byte signature")
        info["pk"], info["sig"] = pk, sig
    return info


def sign_ticket(identity: Any, name: str, me: dict[str, Any]) -> dict[str, Any]:
    """``me`` with the member's signature over what others rely on (its id, address, bandwidth, flags,
    declared weight, gathered data and the ticket's time), for the averager called ``name``."""
    ticket = dict(me, since=get_dht_time())
    ticket["pk"] = identity.public_key
    ticket["sig"] = identity.sign_record([name, [ticket.get(f) for f in _TICKET_FIELDS]])
    return ticket


def check_ticket(name: str, member: dict[str, Any], proven: bytes | None = None) -> None:
    """Raise BadRequest unless ``member`` was signed by the peer it names, recently, for this averager
    (and, given ``proven``, is the peer whose connection sent it)."""
    if proven is not None and member["id"] != proven:
        raise BadRequest("peer info names another peer than the one asking")
    pk, sig = member.get("pk"), member.get("sig")
    if pk is None or sig is None:
        raise BadRequest(f"member {member['id'].hex()[:8]} carries no signed ticket")
    try:
        owner = peer_id_from_public_key(pk)
    except ValueError:
        raise BadRequest("a member ticket's key is not an Ed25519 key") from None
    if owner != member["id"]:
        raise BadRequest("a member ticket is signed by another peer than the member")
    if abs(get_dht_time() - member["since"]) > TICKET_MAX_AGE:
        raise BadRequest("a member ticket is too old (or from the future)")
    if not verify_record(pk, [name, [member.get(f) for f in _TICKET_FIELDS]], sig):
        raise BadRequest(f"member {member['id'].hex()[:8]}'s ticket does not match its signature")


class Matchmaker:
    """Finds a group for one averager (see the module docstring).

    Args:
        endpoint, dht: the peer's endpoint (handlers are registered on it) and DHT node.
        name: RPC namespace, unique per averager on the endpoint.
        target_group_size, min_group_size: group size bounds.
        client_mode: never lead (nobody can call this peer); only join.
        merge_when_alone: a peer alone under its key moves to a sibling key where a group is short of
            members, or to the root key, after a quiet period, so that lonely peers of different buckets
            still find each other (off for a strict Moshpit grid).
        early_start: a leader may start a group that is not full before its deadline once every peer it
            saw has joined (off for scheduled rounds, where waiting for the deadline costs nothing).
        end_when_alone: a peer that finds nobody under any key twice in a row ends its search early (off when
            the caller already knows that others are at this round, as the Optimizer's progress tracker does:
            two peers whose declarations were not yet visible to each other would both give up).
        bans: shared with the all-reduce, which bans members that failed it.
        request_timeout: seconds to wait for a leader's answer to a join request.
    """

    def __init__(self, endpoint: Endpoint, dht: DHTNode, name: str, *, target_group_size: int, min_group_size: int,
                 client_mode: bool, bans: BanList, request_timeout: float = 3.0, merge_when_alone: bool = True,
                 early_start: bool = True, end_when_alone: bool = True) -> None:
        if min_group_size < 1 or target_group_size < min_group_size:
            raise ValueError(f"need 1 <= min_group_size <= target_group_size, got {min_group_size}, {target_group_size}")
        self.endpoint = endpoint
        self.dht = dht
        self.name = name
        # members sign what they declare (a ticket) when identities are proven: with an encrypted endpoint
        # whose key is the DHT node's
        self.signed = bool(getattr(endpoint, "encryption", False)) and getattr(endpoint, "peer_id", None) == dht.peer_id
        self.target_group_size = target_group_size
        self.min_group_size = min_group_size
        self.client_mode = client_mode
        self.bans = bans
        self.request_timeout = request_timeout
        self.merge_when_alone = merge_when_alone
        self.early_start = early_start
        self.end_when_alone = end_when_alone
        self.search: _Search | None = None
        self._background: set[asyncio.Task] = set()
        self.store_latency = AdaptiveDeadline(initial=0.1, factor=1.0, margin=0.0, floor=0.0, ceiling=10.0)
        self._recent: OrderedDict[bytes, _Search] = OrderedDict()  # by token, for late ``await`` calls
        self.stats = {"join_requests": 0, "joins_refused": 0, "dht_gets": 0, "merges": 0}

    @property
    def join_method(self) -> str:
        return f"{self.name}.join"

    @property
    def await_method(self) -> str:
        return f"{self.name}.await"

    def register(self) -> None:
        self.endpoint.register(self.join_method, self._rpc_join)
        self.endpoint.register(self.await_method, self._rpc_await)

    def unregister(self) -> None:
        self.endpoint.unregister(self.join_method)
        self.endpoint.unregister(self.await_method)
        self._abandon(self.search)
        for task in list(self._background):
            task.cancel()

    # ------------------------------------------------------------------ the search

    async def look_for_group(self, key: str, deadline: float, me: dict[str, Any]) -> GroupInfo | None:
        """Declare under ``key`` and find a group before ``deadline`` (DHT time); None if there is none."""
        if self.search is not None:
            raise RuntimeError("this averager is already looking for a group")
        if self.signed:
            me = sign_ticket(self.endpoint.identity, self.name, me)
        search = _Search(key, deadline, (deadline, me["id"]), me)
        search.outcome = asyncio.get_running_loop().create_future()
        self.search = search
        self._recent[search.token] = search
        while len(self._recent) > 8:
            self._recent.popitem(last=False)
        try:
            return await self._search(search)
        finally:
            self.search = None
            self._abandon(search)

    def _abandon(self, search: _Search | None) -> None:
        if search is None:
            return
        if not search.closed and not self.endpoint.closed:
            self._publish_soon(search, search.key, None)  # withdraw, so that nobody waits for us
        search.closed = True
        if search.outcome is not None and not search.outcome.done():
            search.outcome.set_result(None)  # followers waiting in ``await`` learn the group is off
        search.changed.set()

    async def _publish(self, search: _Search, key: str, state: int | None, stamp: int | None = None) -> None:
        """Declare this search under ``key`` in ``state``, or withdraw it (``state`` None: a tombstone
        that has already expired, which readers skip). Each publication expires a hair later than the one
        before, so that the latest wins in the DHT whatever order the stores land in."""
        if stamp is None:
            search.stamp = stamp = search.stamp + 1
        me = search.me
        if state is None:
            value = [0.0, "", False, me["id"], None]
        else:
            value = [search.deadline, me["addr"], self.client_mode, me["id"], state]
        stored = time.monotonic()
        try:
            subkey = me["id"] + search.token + owner_marker(self.dht.public_key).encode()  # owned: only we can write it
            await self.dht.store(key, value, search.deadline + stamp * 1e-3, subkey=subkey)
        except Exception as e:  # the DHT being unhappy must not crash a step
            logger.debug("could not publish under %s: %r", key, e)
            return
        if state == LOOKING:
            self.store_latency.observe(time.monotonic() - stored)

    def _publish_soon(self, search: _Search, key: str, state: int | None) -> None:
        """:meth:`_publish` in the background (from a handler, or where nothing needs to wait for it)."""
        search.stamp += 1  # taken now: the order of the calls is the order that counts
        task = asyncio.get_running_loop().create_task(self._publish(search, key, state, search.stamp))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _move(self, search: _Search, key: str) -> None:
        old, search.key = search.key, key
        self.stats["merges"] += 1
        self._publish_soon(search, old, None)
        await self._publish(search, key, LOOKING)

    async def _search(self, search: _Search) -> GroupInfo | None:
        await self._publish(search, search.key, LOOKING)
        refused: set[bytes] = set()
        busy_retry_at: dict[bytes, float] = {}
        poll = 0.05
        # how long the set of declared peers must stay unchanged before a leader starts a group that is not
        # full: long enough for a peer that has started looking to become visible (a few DHT stores)
        # and a quarter of the window, which adapts to how long groups take to form
        window = max(0.0, search.deadline - get_dht_time())
        settle = min(0.5 * window, max(0.15, 4 * self.store_latency.value, 0.25 * window))
        look_around = min(settle, max(0.05, 2 * self.store_latency.value))
        last_seen: frozenset = frozenset()
        last_change = time.monotonic()
        home = search.key  # its number of bits sets which sibling keys a lone peer looks at
        lone_wait = settle * (1 + 0.5 * random.random())  # jittered: two lone peers must not swap keys in step
        found_nobody = False  # a lone peer looked under every key around and saw nobody
        while True:
            left = search.deadline - get_dht_time()
            if search.outcome.done():
                return search.outcome.result()
            if left <= 0:
                return self._begin(search) if len(search.followers) + 1 >= self.min_group_size else None
            declared = await self._declared(search)
            search.defer_to_better = not search.followers and any(
                d["rank"] < search.rank and not d["client"] and d["id"] not in refused and d["state"] != FOLLOWING
                for d in declared)
            if (self.merge_when_alone and not declared and not search.followers
                    and time.monotonic() - last_change >= lone_wait):
                # alone under this key: go where a group is forming under a sibling key or the root key
                # (no bits), where every lonely peer goes; with nobody anywhere twice in a row, end the
                # search rather than wait out the rest of the window alone
                key, someone = await self._key_with_company(search, home)
                if key is None and someone:  # a lone peer ranked below us is coming here
                    found_nobody, last_change = False, time.monotonic()
                    continue
                if key is None:
                    if found_nobody and self.end_when_alone:
                        return None  # a second look, a lone wait later, still found nobody
                    found_nobody = True
                    key = home[: home.rindex(".0b") + 3]  # the root key: where lone peers meet
                    if key == search.key:
                        last_change = time.monotonic()
                        continue
                await self._move(search, key)
                refused.clear()
                busy_retry_at.clear()
                last_seen, last_change = frozenset(), time.monotonic()
                continue
            patient = time.monotonic() - search.started < (settle if not self.early_start else look_around)
            if not search.followers and not patient:
                # (peers that start together must see each other's declarations before choosing a leader, or two
                # of them may each gather followers: wait a couple of DHT store times first, a whole settle
                # period in scheduled rounds, where everyone starts at once)
                # leaders first (they take anyone, and a group that has started to gather fills up sooner), then
                # better-ranked peers; worse-ranked ones that lead nobody are not asked: they come to us, and
                # asking them back while they ask us would only have both sides answer "busy"
                candidates = [d for d in declared if not d["client"] and d["id"] not in refused and d["state"] != FOLLOWING
                              and busy_retry_at.get(d["id"], 0.0) <= time.monotonic()
                              and (d["rank"] < search.rank or d["state"] == LEADING)]
                candidates.sort(key=lambda d: (d["state"] != LEADING, d["rank"] > search.rank, d["rank"]))
                for candidate in candidates:
                    if search.followers or search.outcome.done():
                        break
                    group = await self._try_join(search, candidate, refused, busy_retry_at)
                    if group is not None:
                        return group
                    if search.deadline <= get_dht_time():
                        break
            if search.followers and not search.outcome.done():
                # two leaders under one key (one did not see the other in time) would split its peers into
                # two short groups: the worse-ranked one takes its whole group over to the better-ranked one
                leaders = sorted((d for d in declared if d["state"] == LEADING and d["rank"] < search.rank
                                  and d["id"] not in refused and busy_retry_at.get(d["id"], 0.0) <= time.monotonic()),
                                 key=lambda d: d["rank"])
                for leader in leaders:
                    group = await self._try_join(search, leader, refused, busy_retry_at, bring=search.followers)
                    if group is not None or search.deadline <= get_dht_time():
                        break
            if search.outcome.done():
                return search.outcome.result()
            size = len(search.followers) + 1
            if size >= self.target_group_size and not self.client_mode:
                return self._begin(search)
            seen = frozenset(d["id"] for d in declared) | {f["id"] for f in search.followers}
            if seen != last_seen:
                last_seen, last_change = seen, time.monotonic()
            if size >= self.min_group_size and size > 1 and not self.client_mode:
                # start early when every live peer ranked below has joined and nothing changed for a while
                # (peers that have not declared yet cannot be seen: the quiet period gives them time)
                joined = {f["id"] for f in search.followers}
                waiting_below = [d for d in declared if (d["rank"] > search.rank or d["client"]) and d["id"] not in joined
                                 and d["state"] == LOOKING]
                if self.early_start and not waiting_below and time.monotonic() - last_change >= settle:
                    return self._begin(search)
            search.changed.clear()
            wait = min(max(0.0, search.deadline - get_dht_time()), poll)
            try:
                await asyncio.wait_for(search.changed.wait(), wait)
            except asyncio.TimeoutError:
                pass
            poll = min(poll * 1.5, 0.5)

    async def _key_with_company(self, search: _Search, home: str) -> tuple[str | None, bool]:
        """Where a lone peer should look next, and whether it saw anyone: of the sibling keys of ``home``
        (as many bits) and the root key, the one with the most peers declared as long as they do not fill
        a group yet (the root key on a tie). Groups that did not fill up leave keys short of peers (each
        member moves by its index in the group), which scatters the last peers of a swarm over keys where
        each would wait alone. Two lone peers must not swap keys: of two, the worse-ranked one moves to
        the better-ranked one, which stays where it is (None, True)."""
        best, best_count, best_lone, someone = None, 1, None, False
        for key, declared in (await self._declared_around(search, home)).items():
            someone = someone or bool(declared)
            if best_count < len(declared) < self.target_group_size:
                best, best_count = key, len(declared)
            elif len(declared) == 1 and declared[0]["rank"] < search.rank and not declared[0]["client"]:
                if best_lone is None or declared[0]["rank"] < best_lone[0]:
                    best_lone = (declared[0]["rank"], key)
        if best is None and best_lone is not None:
            best = best_lone[1]
        return best, someone

    async def _declared_around(self, search: _Search, home: str) -> dict[str, list[dict[str, Any]]]:
        """Live declarations under the root key and the sibling keys of ``home`` (root first), this
        search's own key left out; empty lists where the DHT could not be read."""
        root = home[: home.rindex(".0b") + 3]
        bits = len(home) - len(root)
        keys = [root] + ([f"{root}{i:0{bits}b}" for i in range(2**bits)] if 0 < bits <= MAX_SIBLING_BITS else [])
        keys = [key for key in keys if key != search.key]
        self.stats["dht_gets"] += 1
        try:
            found = await self.dht.get_many(keys, latest=True) if keys else {}
        except Exception as e:
            logger.debug("could not read the keys around %s: %r", home, e)
            found = {}
        return {key: self._live_declarations(found.get(key), search) for key in keys}

    async def _declared(self, search: _Search) -> list[dict[str, Any]]:
        """Live, unbanned peers declared under the search's key, other than this one."""
        self.stats["dht_gets"] += 1
        try:
            found = await self.dht.get(search.key, latest=True)
        except Exception as e:
            logger.debug("could not read %s: %r", search.key, e)
            return []
        out = self._live_declarations(found, search)
        search.bucket_size = len(out) + 1
        return out

    def _live_declarations(self, found: Any, search: _Search) -> list[dict[str, Any]]:
        if found is None or not isinstance(found.value, dict):
            return []
        now = get_dht_time()
        latest: dict[bytes, dict[str, Any]] = {}
        for subkey, item in found.value.items():
            owner = declaration_owner(subkey)
            if owner is None:
                continue  # nobody owns it: anyone could have written it, in anyone's name
            value = getattr(item, "value", None)
            if not isinstance(value, list) or len(value) != 5:
                continue
            deadline, addr, client, pid, state = value
            if (not isinstance(deadline, (int, float)) or not isinstance(addr, str) or not isinstance(pid, bytes)
                    or state not in (LOOKING, LEADING, FOLLOWING)):
                continue
            if deadline <= now or pid == search.me["id"] or pid in self.bans:
                continue  # withdrawn (tombstones have deadline 0), expired, ourselves, or failed us lately
            try:
                owner_id = peer_id_from_public_key(owner)
            except ValueError:
                continue
            named = address_peer_id(addr)
            if owner_id != pid or (named is not None and named != pid):
                continue  # a declaration in another peer's name, or pointing at another peer
            if pid not in latest or latest[pid]["rank"][0] < deadline:
                latest[pid] = {"id": pid, "addr": addr, "client": bool(client), "rank": (float(deadline), pid), "state": state}
        return list(latest.values())

    async def _try_join(self, search: _Search, leader: dict[str, Any], refused: set[bytes],
                        busy_retry_at: dict[bytes, float], bring: list[dict[str, Any]] | None = None) -> GroupInfo | None:
        """Ask ``leader`` to take this peer (and the followers in ``bring``, for a leader handing its group
        over); once accepted, wait for its group. The group also becomes this search's outcome, which
        is how followers brought along learn it."""
        me = search.me
        request = {"key": search.key, "rank": [search.rank[0], search.rank[1]], "peer": me}
        if bring:
            request["with"] = list(bring)
        search.joining = True
        search.join_done.clear()
        self.stats["join_requests"] += 1
        try:
            reply = await self.endpoint.call(leader["addr"], self.join_method, request, timeout=self.request_timeout)
        except (PeerUnreachable, RPCTimeout) as e:
            # (not banned for a slow answer: a busy leader is alive, and a dead one declares nothing again)
            logger.debug("leader %s did not answer: %r", leader["addr"], e)
            if isinstance(e, PeerUnreachable):
                self.bans.ban(leader["id"])
            refused.add(leader["id"])
            return None
        except RPCError as e:
            refused.add(leader["id"])
            logger.debug("join at %s failed: %r", leader["addr"], e)
            return None
        finally:
            search.joining = False
            search.join_done.set()
        if not isinstance(reply, dict) or not reply.get("ok"):
            self.stats["joins_refused"] += 1
            logger.debug("join refused by %s: %r", leader["addr"], reply)
            why = reply.get("why") if isinstance(reply, dict) else None
            if why in ("busy", "not leading yet"):
                busy_retry_at[leader["id"]] = time.monotonic() + (0.03 if why == "busy" else 0.15) * (1 + random.random())
            else:
                refused.add(leader["id"])
            return None
        # accepted: from now on this peer follows; wait for the leader to start the round
        search.following = True
        self._publish_soon(search, search.key, FOLLOWING)
        token, wait = reply.get("token"), reply.get("left")
        wait = float(wait) if isinstance(wait, (int, float)) and 0 <= wait < 3600 else 0.0
        try:
            answer = await self.endpoint.call(leader["addr"], self.await_method, {"token": token, "id": me["id"]},
                                              timeout=wait + self.request_timeout)
            group = self._parse_group(answer, search)
        except (PeerUnreachable, RPCTimeout) as e:
            logger.debug("leader %s vanished before the round: %r", leader["addr"], e)
            self.bans.ban(leader["id"])
            group = None
        except (RPCError, BadRequest) as e:
            logger.debug("bad group from %s: %r", leader["addr"], e)
            group = None
        if group is None:
            search.following = False  # look on (still leading the followers it has), if time is left
            refused.add(leader["id"])
            if not search.closed:
                self._publish_soon(search, search.key, LEADING if search.followers else LOOKING)
        elif not search.outcome.done():
            search.outcome.set_result(group)
        return group

    def _parse_group(self, answer: Any, search: _Search) -> GroupInfo | None:
        if not isinstance(answer, dict) or not answer.get("ok"):
            return None
        wire = answer.get("group")
        if not isinstance(wire, dict):
            raise BadRequest("group description missing")
        gid, members, shares = wire.get("gid"), wire.get("members"), wire.get("shares")
        if not isinstance(gid, bytes) or not isinstance(members, list) or not isinstance(shares, list):
            raise BadRequest("malformed group description")
        members = [_member_info(m) for m in members]
        if len(shares) != len(members) or not all(isinstance(s, (int, float)) and s >= 0 for s in shares):
            raise BadRequest("shares do not match the members")
        ids = [m["id"] for m in members]
        if len(set(ids)) != len(ids):
            raise BadRequest("a member appears twice in the group")
        if self.signed:  # the leader cannot add members who did not join (or alter what they declared)
            for member in members:
                check_ticket(self.name, member)
        if search.me["id"] not in ids:
            raise BadRequest("the group does not contain this peer")
        # the leader's formation time (from the first arrival to a full group) is what deadlines should
        # allow for; a follower that arrived last saw its group form at once
        formed_in = wire.get("formed_in")
        formed_in = float(formed_in) if isinstance(formed_in, (int, float)) and 0 <= formed_in < 3600 else 0.0
        return GroupInfo(gid, search.key, members, [float(s) for s in shares], ids.index(search.me["id"]),
                         max(formed_in, time.monotonic() - search.started), search.bucket_size)

    def _begin(self, search: _Search) -> GroupInfo:
        """Leader: fix the group id, the order and the shares, and tell the followers."""
        gid = os.urandom(16)
        everyone = [search.me, *search.followers]
        order = member_order(gid, [m["id"] for m in everyone])
        members = [everyone[i] for i in order]
        can_reduce = [not m["client"] for m in members]
        shares = [float(s) for s in optimal_shares([m["bw"] for m in members], can_reduce)]
        ids = [m["id"] for m in members]
        group = GroupInfo(gid, search.key, members, shares, ids.index(search.me["id"]),
                          time.monotonic() - search.started, search.bucket_size)
        search.group = group
        if not search.outcome.done():
            search.outcome.set_result(group)
        search.changed.set()
        return group

    # ------------------------------------------------------------------ serving other peers

    async def _rpc_join(self, payload: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("key"), str):
            raise BadRequest("a join request needs a group key")
        rank = payload.get("rank")
        if (not isinstance(rank, list) or len(rank) != 2 or not isinstance(rank[0], (int, float))
                or not isinstance(rank[1], bytes)):
            raise BadRequest("a join request needs the requester's rank [deadline, peer id]")
        peer = _member_info(payload.get("peer"))
        brought = payload.get("with", [])
        if not isinstance(brought, list) or len(brought) > 4096:
            raise BadRequest("'with' must be a list of the followers a leader brings along")
        brought = [_member_info(m) for m in brought]
        if self.signed:  # nobody joins in another's name, and a leader handing over brings only signed members
            check_ticket(self.name, peer, ctx.peer_id)
            for member in brought:
                check_ticket(self.name, member)
        search = self.search
        if search is None or search.closed or search.key != payload["key"]:
            return {"ok": False, "why": "not looking"}
        better = (float(rank[0]), rank[1]) <= search.rank
        if search.joining and not better:
            # our own join request is out (answered at once, accepted or not): wait for it rather than send
            # the requester away. Waits only go from worse- to better-ranked peers, so they never form a cycle.
            try:
                await asyncio.wait_for(search.join_done.wait(), max(0.0, min(self.request_timeout, ctx.time_left - 0.1)))
            except asyncio.TimeoutError:
                pass
        if search.closed or search.following or search.outcome.done() or self.client_mode:
            return {"ok": False, "why": "not leading"}
        if search.joining:
            return {"ok": False, "why": "busy"}
        if not search.followers and (better or search.defer_to_better):
            # a better-ranked peer may only join a peer that already leads a group (a peer with followers
            # joins only better-ranked leaders, so it never waits on its own follower); and a peer that knows
            # a better-ranked one that has not refused it yet leaves the leading to that one
            return {"ok": False, "why": "not leading yet"}
        if any(f["id"] == peer["id"] for f in search.followers):
            return {"ok": True, "token": search.token, "left": max(0.0, search.deadline - get_dht_time())}
        newcomers = {m["id"]: m for m in (peer, *brought)}
        if search.me["id"] in newcomers or any(f["id"] in newcomers for f in search.followers):
            raise BadRequest("a group handed over must not hold members of this one")
        if len(search.followers) + 1 + len(newcomers) > self.target_group_size:
            return {"ok": False, "why": "full"}
        search.followers.extend(newcomers.values())
        if len(search.followers) == len(newcomers):
            self._publish_soon(search, search.key, LEADING)  # others need not wait for us to join them any more
        search.changed.set()
        return {"ok": True, "token": search.token, "left": max(0.0, search.deadline - get_dht_time())}

    async def _rpc_await(self, payload: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("token"), bytes):
            raise BadRequest("an await request needs the token of a join")
        search = self._recent.get(payload["token"])
        if search is None or search.outcome is None:
            return {"ok": False, "why": "unknown search"}
        try:
            group = await asyncio.wait_for(asyncio.shield(search.outcome), max(0.0, ctx.time_left - 0.05))
        except asyncio.TimeoutError:
            return {"ok": False, "why": "not started in time"}
        if group is None or payload.get("id") not in {m["id"] for m in group.members}:
            return {"ok": False, "why": "disbanded"}
        return {"ok": True, "group": group.to_wire()}

