"""The asynchronous Kademlia node.

One :class:`DHTNode` serves the DHT's RPCs on an :class:`~hivesim.net.Endpoint` and runs lookups for
its owner. Lookups are iterative and parallel (``alpha`` requests in flight per key) and *shared*: when
many keys are looked up at once, a peer that is among the candidates for several of them is asked
about all of them in one request. A lookup for a key ends when the ``bucket_size`` nearest peers seen
have all answered (or failed), or as soon as a value is found unless ``latest=True`` asks for the
newest version among all of them.

Outsiders can call every node, so what they claim is checked (see also :mod:`hivesim.dht.storage`):

* **contacts are admitted with proof**: with encryption on, a caller enters the routing table only if the
  id it claims is the id its connection proved (``ctx.peer_id``) and the id its address names
  (``tcp://host:port/<key>``); contacts heard second hand, in find replies, are asked during lookups only
  if their address names the id they claim, and enter the table only once they answered us directly.
  A caller not yet in the table is pinged back at the address it gave before it is added, and a
  known id is never re-pointed to a new address while its holder still answers at the old one (without
  encryption, where ids are only declared, this is what keeps an impostor from taking a peer's entry).
  The table bounds how many contacts one IP and one subnet hold (:mod:`hivesim.dht.routing`).
* **records are charged to their writer**: the peer whose connection sent them (its proven id; without
  encryption, the id it declares), for the storage's per-writer quotas and fair eviction;
* **lifetimes are bounded**: a record expiring more than ``max_ttl`` ahead is refused on store and
  dropped from find replies, so nobody can pin a key forever;
* **a find for many keys** looks at the nearest buckets only and yields to the event loop every
  ``_FIND_SLICE`` keys, so one request cannot stall the node.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hivesim.dht import protocol
from hivesim.dht.protocol import FIND, PING, STORE, Limits
from hivesim.dht.routing import RoutingTable, id_from_bytes, id_of_key_bytes, id_to_bytes, key_id, random_id
from hivesim.dht.storage import DHTRecord, LocalStorage, ValueWithExpiration, get_dht_time, is_owned
from hivesim.dht.validation import CompositeValidator, RecordRejected, RecordValidator, SignatureValidator
from hivesim.net.errors import RPCError
from hivesim.net.identity import Identity
from hivesim.net.links import LinkModel
from hivesim.net.rpc import CallContext, Endpoint
from hivesim.net.secure import address_peer_id

logger = logging.getLogger(__name__)

Contact = tuple[int, str]

_FIND_SLICE = 128  # keys a find handler answers before it lets the event loop run other work
_MAX_VERIFICATIONS = 32  # callers being pinged back at once; more are ignored until they call again


@dataclass(frozen=True)
class LookupStats:
    """How one key's lookup went: its depth in hops, find requests sent, nodes that answered."""

    hops: int
    requests: int
    answered: int


@dataclass
class _Lookup:
    """The state of one key's iterative lookup."""

    target: int
    size: int
    candidates: dict[int, str] = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)
    answered: dict[int, str] = field(default_factory=dict)
    inflight: int = 0
    plain: DHTRecord | None = None
    subkeys: dict[bytes, DHTRecord] = field(default_factory=dict)
    holders: set[int] = field(default_factory=set)
    depth: dict[int, int] = field(default_factory=dict)  # hops from us at which each candidate was learnt
    requests: int = 0
    pending: set[int] = field(default_factory=set)  # asked, not answered or failed yet
    verdicts: dict[int, list] = field(default_factory=dict)  # node -> its verdicts on records sent with find

    @property
    def found(self) -> bool:
        return self.plain is not None or bool(self.subkeys)

    def nearest_answered(self) -> list[Contact]:
        return sorted(self.answered.items(), key=lambda c: c[0] ^ self.target)[: self.size]

    def next_candidate(self, banned: Any) -> Contact | None:
        """The nearest not-yet-asked candidate that could still enter the ``size`` nearest answers."""
        best: Contact | None = None
        for node_id, address in self.candidates.items():
            if node_id in self.asked or banned(node_id):
                continue
            if best is None or node_id ^ self.target < best[0] ^ self.target:
                best = (node_id, address)
        if best is None:
            return None
        # Nodes still being asked count as answers to come: asking beyond the ``size`` nearest of
        # those and the answered ones costs requests that can only be wasted unless one of them fails.
        if len(self.answered) + len(self.pending) >= self.size:
            kth = sorted(self.target ^ n for n in (*self.answered, *self.pending))[self.size - 1]
            if best[0] ^ self.target >= kth:
                return None
        return best

    def ranks_within(self, node_id: int, count: int, me: int | None) -> bool:
        """Whether ``node_id`` is among the ``count`` nearest to the target of the nodes seen so far
        (``me`` included, unless None)."""
        mine = node_id ^ self.target
        closer = sum(1 for other in self.candidates if other ^ self.target < mine)
        closer += me is not None and me ^ self.target < mine
        return closer < count

    def merge(self, records: Iterable[DHTRecord], holder: int) -> None:
        got = False
        for record in records:
            got = True
            if record.subkey is None:
                if self.plain is None or record.expiration_time > self.plain.expiration_time:
                    self.plain = record
            else:
                current = self.subkeys.get(record.subkey)
                if current is None or record.expiration_time > current.expiration_time:
                    self.subkeys[record.subkey] = record
        if got:
            self.holders.add(holder)

    @property
    def hops(self) -> int:
        """Lookup depth: hops to the nearest holder of the value, else to the farthest of the k nearest."""
        if self.holders:
            return min(self.depth.get(h, 0) for h in self.holders)
        return max((self.depth.get(n, 0) for n, _ in self.nearest_answered()), default=0)

    def result(self) -> list[DHTRecord]:
        """Newest wins: a plain value that expires after every subkey replaces the dictionary, except
        that a plain value nobody owns never hides owned subkeys (as in storage)."""
        newest_subkey = max((r.expiration_time for r in self.subkeys.values()), default=float("-inf"))
        if self.plain is not None and self.plain.expiration_time > newest_subkey:
            if is_owned(self.plain) or not any(is_owned(r) for r in self.subkeys.values()):
                return [self.plain]
        return list(self.subkeys.values())


class DHTNode:
    """A Kademlia DHT node (asyncio). Create with :meth:`create`; stop with :meth:`shutdown`.

    Args (of :meth:`create`):
        initial_peers: addresses (``tcp://host:port``) of nodes already in the DHT.
        endpoint: an endpoint to serve on (shared with the peer's other roles); one is made if None.
        host, port, links: where a new endpoint binds and its link model.
        endpoint_options: more :class:`~hivesim.net.Endpoint` arguments for a new endpoint (e.g. a small
            ``pool_size`` when a process packs hundreds of nodes).
        identity: the node's key pair; its peer id is the node id.
        client_mode: make requests but never enter other nodes' routing tables (peers behind NAT).
        bucket_size: k; also how many nearest nodes a lookup settles on.
        num_replicas: nodes each value is stored on. 8 (hivemind uses 5) keeps the chance that all of a
            value's replicas are among a third of the swarm failing at once at (1/3)^8 = 0.015%. A store
            looks up this many nearest nodes; a get looks through the ``bucket_size`` nearest.
        alpha: requests in flight per key during a lookup.
        rpc_timeout: seconds to wait for one peer's answer.
        refresh_period: buckets without traffic for this long are refreshed by a lookup.
        cache_nearest: after a successful get, store the value on this many of the nearest nodes asked
            that lacked it (for a latest get: replicas that missed the newest version).
        record_validators: extra validators; signature checking of owned keys is always on.
        max_storage_bytes, limits: bounds on what peers can make this node hold or parse.
        max_ttl: records may expire at most this many seconds ahead (24 h), plus ``max_clock_skew`` (60 s);
            later ones are refused on store and dropped from find replies.
        max_subkeys_per_writer, max_bytes_per_writer: per-writer quotas of this node's storage (1024
            subkeys per key; an eighth of ``max_storage_bytes``), see :class:`~hivesim.dht.storage.LocalStorage`.
        max_contacts_per_ip, max_contacts_per_subnet, local_by_port: routing-table bounds (2 per public IP,
            8 per /24 or /64; loopback and private hosts bounded per host:port), see
            :class:`~hivesim.dht.routing.RoutingTable`. None turns a bound off.
    """

    def __init__(self) -> None:  # use DHTNode.create(...)
        self.endpoint: Endpoint
        self.identity: Identity
        self.node_id: int
        self.routing: RoutingTable
        self.storage: LocalStorage
        self.validator: CompositeValidator
        self.client_mode = False
        self.limits = Limits()
        self._owns_endpoint = False
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._secure = False  # the endpoint proves callers' ids (encryption on)
        self._verifying: set[int] = set()  # callers being pinged back before they enter the table
        self.refused_contacts = 0  # callers whose claimed id their connection or address contradicted

    @classmethod
    async def create(
        cls,
        initial_peers: Sequence[str] = (),
        *,
        endpoint: Endpoint | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        links: LinkModel | None = None,
        endpoint_options: dict[str, Any] | None = None,
        identity: Identity | None = None,
        client_mode: bool = False,
        bucket_size: int = 20,
        num_replicas: int = 8,
        alpha: int = 3,
        depth_modulo: int = 5,
        max_failures: int = 3,
        rpc_timeout: float = 3.0,
        refresh_period: float = 600.0,
        cache_nearest: int = 1,
        record_validators: Iterable[RecordValidator] = (),
        max_storage_bytes: int = 256 << 20,
        limits: Limits | None = None,
        ensure_bootstrap_success: bool = True,
        seed: int | None = None,
        max_ttl: float = 24 * 3600.0,
        max_clock_skew: float = 60.0,
        max_subkeys_per_writer: int = 1024,
        max_bytes_per_writer: int | None = None,
        max_contacts_per_ip: int | None = 2,
        max_contacts_per_subnet: int | None = 8,
        local_by_port: bool = True,
    ) -> "DHTNode":
        self = cls()
        if identity is not None and endpoint is not None and identity.peer_id != endpoint.peer_id:
            raise ValueError("the DHT node's identity must be its endpoint's: peers prove their ids with the "
                             "endpoint's key (pass one of the two, or the same identity to both)")
        self.identity = identity or (endpoint.identity if endpoint is not None else Identity())
        self.node_id = id_from_bytes(self.identity.peer_id)
        self.client_mode = client_mode
        self.bucket_size = bucket_size
        self.num_replicas = max(1, min(num_replicas, bucket_size))
        self.alpha = alpha
        self.rpc_timeout = rpc_timeout
        self.refresh_period = refresh_period
        self.cache_nearest = cache_nearest
        self.limits = limits or Limits()
        self.rng = random.Random(seed)
        self.routing = RoutingTable(
            self.node_id, bucket_size, depth_modulo, max_failures, max_per_ip=max_contacts_per_ip,
            max_per_subnet=max_contacts_per_subnet, local_by_port=local_by_port,
        )
        self.storage = LocalStorage(
            max_bytes=max_storage_bytes, max_ttl=max_ttl, max_clock_skew=max_clock_skew,
            max_subkeys_per_writer=max_subkeys_per_writer, max_bytes_per_writer=max_bytes_per_writer,
        )
        validators = list(record_validators)
        if not any(isinstance(v, SignatureValidator) for v in validators):
            validators.append(SignatureValidator(self.identity))
        self.validator = CompositeValidator(validators)
        if endpoint is None:
            endpoint = await Endpoint(host, port, links=links, identity=self.identity, **(endpoint_options or {})).start()
            self._owns_endpoint = True
        self.endpoint = endpoint
        # with encryption on, the endpoint's address names its key, and callers' ids are proven
        self._secure = address_peer_id(endpoint.address) is not None
        if not client_mode:
            endpoint.register(PING, self._rpc_ping)
            endpoint.register(STORE, self._rpc_store)
            endpoint.register(FIND, self._rpc_find)
        try:
            await self.bootstrap(initial_peers, ensure_success=ensure_bootstrap_success)
        except BaseException:
            await self.shutdown()
            raise
        self._spawn(self._refresh_forever())
        return self

    # ------------------------------------------------------------------ identity and lifecycle

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key

    def _me(self) -> list | None:
        return None if self.client_mode else [id_to_bytes(self.node_id), self.endpoint.address]

    async def shutdown(self) -> None:
        """Stop background work and (if it owns it) the endpoint. Leaves without notice, like a crash."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_endpoint:
            await self.endpoint.close()
        else:
            for name in (PING, STORE, FIND):
                self.endpoint.unregister(name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def bootstrap(self, initial_peers: Sequence[str], ensure_success: bool = True) -> None:
        """Ping the given peers, then look up our own id to fill the routing table around us."""
        addresses = [a for a in initial_peers if a != getattr(self.endpoint, "_address", None)]
        if not addresses:
            return
        answers = await asyncio.gather(*(self.ping(a) for a in addresses))
        if not any(answers):
            if ensure_success:
                raise ConnectionError(f"none of the initial peers answered: {', '.join(addresses[:5])}")
            logger.warning("none of the initial peers answered; starting a swarm of one")
            return
        await self.find_nearest([self.node_id])

    async def ping(self, address: str) -> int | None:
        """Ask ``address`` for its node id; adds it to the routing table. None if it did not answer
        (or answered with an id that its address does not name)."""
        try:
            reply = await self.endpoint.call(address, PING, {"from": self._me()}, timeout=self.rpc_timeout)
            peer = protocol.parse_peer(reply.get("from") if isinstance(reply, dict) else None)
        except (RPCError, ValueError) as e:
            logger.debug("ping %s failed: %s", address, e)
            return None
        if peer is None:
            return None
        named = address_peer_id(address)
        if named is not None and named != id_to_bytes(peer[0]):
            self.refused_contacts += 1
            return None
        self._admit(peer[0], peer[1], answered=peer[1] == address)
        return peer[0]

    # ------------------------------------------------------------------ serving

    def _heard_from(self, payload: Any, ctx: CallContext | None) -> None:
        """A caller says who it is: admit it if its connection and address back the claim (with
        encryption), after it answers a ping at that address."""
        peer = protocol.parse_peer(payload.get("from"))  # ValueError reaches the caller as a RemoteError
        if peer is None:
            return
        node_id, address = peer
        proven = getattr(ctx, "peer_id", None)
        if proven is not None:
            if id_to_bytes(node_id) != proven or address_peer_id(address) != proven:
                self.refused_contacts += 1  # an impostor, or an address that names someone else
                return
        elif self._secure:
            return  # an encrypted endpoint that could not say who called: nothing is proven
        self._admit(node_id, address, answered=False)

    def _names(self, node_id: int, address: str) -> bool:
        """Whether ``address`` may be taken to belong to ``node_id``: it names that id (its key), or it
        names none and this node runs without encryption (nothing can be proven then)."""
        named = address_peer_id(address)
        if named is None:
            return not self._secure
        return named == id_to_bytes(node_id)

    def _admit(self, node_id: int, address: str, answered: bool) -> None:
        """Add a contact that answered us at ``address`` (``answered``), or ping it there first; a known
        id moves to a new address only once its holder no longer answers at the old one."""
        if node_id == self.node_id or self._closed or not self._names(node_id, address):
            return
        current = self.routing.address_of(node_id)
        if current == address or (current is None and (answered or self.routing.waiting_at(node_id) == address)):
            # known there, or waiting in the replacement cache after answering there: no ping-back
            self._saw(node_id, address)
            return
        if node_id in self._verifying or len(self._verifying) >= _MAX_VERIFICATIONS:
            return
        if current is None and not answered and not self.routing.has_room(node_id):
            return  # a caller that could only wait in a full bucket's replacement cache is not worth a ping
        self._verifying.add(node_id)
        self._spawn(self._verify(node_id, address, current, answered))

    async def _verify(self, node_id: int, address: str, current: str | None, answered: bool) -> None:
        try:
            if current is not None and await self._answers_as(current, node_id):
                self._saw(node_id, current)  # still answering where we knew it: not re-pointed
                return
            if answered or await self._answers_as(address, node_id):
                self._saw(node_id, address)
        finally:
            self._verifying.discard(node_id)

    async def _answers_as(self, address: str, node_id: int) -> bool:
        """Whether ``address`` answers a ping as ``node_id``."""
        try:
            reply = await self.endpoint.call(address, PING, {"from": self._me()}, timeout=self.rpc_timeout)
            peer = protocol.parse_peer(reply.get("from") if isinstance(reply, dict) else None)
        except (RPCError, ValueError) as e:
            logger.debug("ping %s failed: %s", address, e)
            return False
        return peer is not None and peer[0] == node_id

    def _saw(self, node_id: int, address: str) -> None:
        if node_id == self.node_id:
            return
        lru = self.routing.add_or_update(node_id, address)
        if lru is not None and not self.routing.is_banned(lru) and not self._closed:
            stale = self.routing.address_of(lru)
            if stale is not None and len(self._tasks) < 64:
                self._spawn(self._check_alive(lru, stale))

    async def _check_alive(self, node_id: int, address: str) -> None:
        """A full bucket met a newcomer: ping its oldest contact; if dead, the newcomer replaces it."""
        if await self._answers_as(address, node_id):
            self.routing.add_or_update(node_id, address)
        else:
            self.routing.mark_failed(node_id)

    def _rpc_ping(self, payload: Any, ctx: CallContext) -> dict:
        if not isinstance(payload, dict):
            raise ValueError("ping payload must be a map")
        self._heard_from(payload, ctx)
        return {"from": self._me()}

    def _rpc_store(self, payload: Any, ctx: CallContext) -> dict:
        if not isinstance(payload, dict):
            raise ValueError("store payload must be a map")
        records = protocol.parse_records(payload.get("records"), self.limits)
        self._heard_from(payload, ctx)
        writer = self._writer(payload, ctx)
        return {"from": self._me(), "ok": [self._store_local(r, writer) for r in records]}

    def _writer(self, payload: dict, ctx: CallContext | None) -> bytes:
        """Whom a store is charged to: the caller's proven id; without encryption, the id it declares."""
        proven = getattr(ctx, "peer_id", None)
        if proven is not None:
            return proven
        peer = payload.get("from")
        if isinstance(peer, list) and len(peer) == 2 and isinstance(peer[0], bytes):
            return peer[0]
        return b"anonymous:" + getattr(ctx, "src", "").encode()

    def _store_local(self, record: DHTRecord, writer: bytes | None = None) -> bool | str:
        """Validate and store one record for ``writer`` (this node if None): True, False (an older or
        refused version) or the reason it was rejected."""
        if record.expiration_time > self.storage.latest_allowed():
            return "the record expires later than this node's max_ttl allows"
        try:
            self.validator.validate(record)
        except RecordRejected as e:
            return str(e)
        return self.storage.store(id_of_key_bytes(record.key), record, self.peer_id if writer is None else writer)

    async def _rpc_find(self, payload: Any, ctx: CallContext) -> dict:
        if not isinstance(payload, dict):
            raise ValueError("find payload must be a map")
        key_ids = protocol.parse_key_ids(payload.get("keys"), self.limits)
        self._heard_from(payload, ctx)
        asker = payload["from"][0] if payload.get("from") else None
        exclude = id_from_bytes(asker) if asker else None
        want_values = payload.get("values", True) is not False
        count = payload.get("n", self.bucket_size)  # how many nearest the asker needs (its beam)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError("'n' must be a positive number of nearest nodes")
        count = min(count, self.bucket_size)
        riders = protocol.parse_records(payload["store"], self.limits) if "store" in payload else None
        found = []
        near: dict[int, list[tuple[int, str]]] = {}
        for index, target in enumerate(key_ids):
            if index and index % _FIND_SLICE == 0:
                await asyncio.sleep(0)  # a find for thousands of keys must not stall the node
            records = [r.to_wire() for r in self.storage.get(target)] if want_values else []
            near[target] = self.routing.nearest(target, count, exclude)
            found.append([records, [[id_to_bytes(i), a] for i, a in near[target]]])
        reply: dict[str, Any] = {"from": self._me(), "found": found}
        if riders is not None:
            replicas = payload.get("replicas")
            if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
                raise ValueError("a find with records needs a positive 'replicas' count")
            replicas = min(replicas, count)
            writer = self._writer(payload, ctx)
            reply["stored"] = [
                self._store_local(r, writer) if self._among_nearest(id_of_key_bytes(r.key), replicas, near, exclude) else None
                for r in riders
            ]
        return reply

    def _among_nearest(self, target: int, count: int, near: dict[int, list[tuple[int, str]]], asker: int | None) -> bool:
        """Whether this node is one of the ``count`` nearest to ``target`` among the nodes it knows
        (the asker included): where a store of that key is meant to land."""
        contacts = near.get(target)
        if contacts is None:
            contacts = near[target] = self.routing.nearest(target, self.bucket_size, asker)
        mine = self.node_id ^ target
        closer = sum(1 for node_id, _ in contacts if node_id ^ target < mine)
        closer += asker is not None and asker ^ target < mine
        return closer < count

    # ------------------------------------------------------------------ lookups

    async def find_nearest(
        self,
        targets: Sequence[int],
        want_values: bool = False,
        latest: bool = False,
        beam_size: int | None = None,
        records: dict[int, list[DHTRecord]] | None = None,
    ) -> dict[int, _Lookup]:
        """Iterative parallel lookup of many ids at once; returns each id's final lookup state.

        A key's lookup settles once its ``beam_size`` (default ``bucket_size``) nearest nodes have answered.
        ``records`` (by target id) ride along with every find request of that target: a node that sees
        itself among the ``beam_size`` nearest to the key by its own routing table stores them at once
        and says so in ``lookup.verdicts``, which saves a store's second round of RPCs.
        """
        beam = beam_size or self.bucket_size
        riding = records or {}
        mine = None if self.client_mode else self.node_id
        lookups = {t: _Lookup(t, beam) for t in dict.fromkeys(targets)}
        for lookup in lookups.values():
            lookup.candidates.update(self.routing.nearest(lookup.target, self.bucket_size))
            lookup.depth.update({n: 1 for n in lookup.candidates})
            if want_values:
                lookup.merge(self._valid(self.storage.get(lookup.target)), self.node_id)

        def finished(lookup: _Lookup) -> bool:
            return want_values and not latest and lookup.found

        running: set[asyncio.Task] = set()
        completions = _Completions()
        request_keys: dict[asyncio.Task, tuple[int, str, list[int]]] = {}

        def schedule() -> None:
            batch: dict[Contact, list[int]] = defaultdict(list)
            ride: dict[Contact, list[DHTRecord]] = defaultdict(list)
            for lookup in lookups.values():
                if finished(lookup):
                    continue
                while lookup.inflight < self.alpha:
                    contact = lookup.next_candidate(self.routing.is_banned)
                    if contact is None:
                        break
                    lookup.asked.add(contact[0])
                    lookup.pending.add(contact[0])
                    lookup.inflight += 1
                    lookup.requests += 1
                    batch[contact].append(lookup.target)
                    if lookup.target in riding and lookup.ranks_within(contact[0], beam, mine):
                        ride[contact].extend(riding[lookup.target])
            for (node_id, address), keys in batch.items():
                riders = ride.get((node_id, address), [])
                request = self._find_at(address, keys, want_values, riders, beam)
                running.add(request)
                request.add_done_callback(completions.add)
                request_keys[request] = (node_id, address, keys, riders)

        schedule()
        try:
            while running:
                for request in await completions.take():
                    running.discard(request)
                    node_id, address, keys, riders = request_keys.pop(request)
                    answer = self._find_answer(request, address, len(keys), riders)
                    verdicts = answer[2] if answer is not None else None
                    if answer is None:
                        self.routing.mark_failed(node_id)
                    else:
                        responder = answer[0]
                        if responder is not None and responder[0] != node_id:
                            self.routing.mark_failed(node_id)  # an address that answers with another id
                            answer = None
                        elif responder is not None:
                            self._admit(responder[0], responder[1], answered=responder[1] == address)
                    for index, target in enumerate(keys):
                        lookup = lookups[target]
                        lookup.inflight -= 1
                        lookup.pending.discard(node_id)
                        if answer is None:
                            continue
                        if verdicts is not None:
                            lookup.verdicts[node_id] = verdicts
                        records, nearest = answer[1][index]
                        lookup.answered[node_id] = address
                        lookup.merge(self._valid(records), node_id)
                        for peer_id, peer_address in nearest:
                            # heard second hand: a candidate only if its address names the id it claims
                            if (peer_id != self.node_id and peer_id not in lookup.candidates
                                    and self._names(peer_id, peer_address)):
                                lookup.candidates[peer_id] = peer_address
                                lookup.depth[peer_id] = lookup.depth.get(node_id, 1) + 1
                if want_values and not latest and all(finished(lookup) for lookup in lookups.values()):
                    break  # every value is found: the requests still out cannot improve the answer
                schedule()
        finally:
            for request in running:
                request.cancel()
        return lookups

    def _find_at(
        self, address: str, keys: list[int], want_values: bool, riders: list[DHTRecord], beam: int
    ) -> asyncio.Future:
        """Send one find request (with ``riders``, a conditional store too: see :meth:`find_nearest`) and
        return the future of its reply, which :meth:`_find_answer` reads. No task per request."""
        payload: dict[str, Any] = {"from": self._me(), "keys": [id_to_bytes(k) for k in keys], "values": want_values, "n": beam}
        if riders:
            payload["store"] = [r.to_wire() for r in riders]
            payload["replicas"] = beam
        return self.endpoint.request(address, FIND, payload, timeout=self.rpc_timeout)

    def _find_answer(
        self, request: asyncio.Future, address: str, count: int, riders: list[DHTRecord]
    ) -> tuple[Any, list, list | None] | None:
        """(responder, found, verdicts on the riders or None) of a finished find, or None if it failed."""
        try:
            if request.cancelled():
                raise RPCError("the request was cancelled")
            reply = request.result()
            if not isinstance(reply, dict):
                raise ValueError("find reply must be a map")
            responder = protocol.parse_peer(reply.get("from"))
            found = protocol.parse_found(reply.get("found"), count, self.limits)
            verdicts = None
            if riders:
                verdicts = reply.get("stored")
                if not isinstance(verdicts, list) or len(verdicts) != len(riders):
                    raise ValueError("find reply must give one store verdict per record sent")
                verdicts = [(rider, verdict) for rider, verdict in zip(riders, verdicts)]
            return responder, found, verdicts
        except (RPCError, ValueError) as e:
            logger.debug("find at %s failed: %s", address, e)
            return None

    def _valid(self, records: list[DHTRecord]) -> list[DHTRecord]:
        """The records that pass the validators and expire no later than ``max_ttl`` allows."""
        good = []
        latest = self.storage.latest_allowed()
        for record in records:
            if record.expiration_time > latest:
                logger.debug("dropping a record that expires beyond max_ttl")
                continue
            try:
                self.validator.validate(record)
                good.append(record)
            except RecordRejected as e:
                logger.debug("dropping an invalid record: %s", e)
        return good

    # ------------------------------------------------------------------ store / get

    async def store(
        self, key: Any, value: Any, expiration_time: float, subkey: Any = None
    ) -> bool:
        """Store ``value`` under ``key`` (and ``subkey``) until ``expiration_time`` (``get_dht_time()`` clock).

        Returns True if at least one of the nearest nodes accepted it: a store is refused where a
        value that expires later is already held (newest wins).
        """
        return (await self.store_many([(key, value, expiration_time, subkey)]))[_key_slot(key, subkey)]

    async def store_many(self, items: Iterable[tuple[Any, Any, float] | tuple[Any, Any, float, Any]]) -> dict:
        """Store many ``(key, value, expiration_time[, subkey])`` with lookups shared across keys.

        Returns ``{key: bool}``, or ``{(key, subkey): bool}`` for items with a subkey.
        """
        prepared: list[tuple[Any, int, DHTRecord]] = []
        for item in items:
            key, value, expiration_time, subkey = (*item, None) if len(item) == 3 else item
            key_bytes = _pack(key)
            record = DHTRecord(key_bytes, None if subkey is None else _pack(subkey), _pack(value), float(expiration_time))
            signed = DHTRecord(record.key, record.subkey, self.validator.sign_value(record), record.expiration_time)
            prepared.append((_key_slot(key, subkey), id_of_key_bytes(key_bytes), signed))
        riders: dict[int, list[DHTRecord]] = defaultdict(list)
        for _, target, record in prepared:
            riders[target].append(record)
        # the records ride along with the lookup's finds: nodes that know they are among the nearest
        # store them right away, and only the nearest that did not get a second request
        lookups = await self.find_nearest(list(riders), beam_size=self.num_replicas, records=riders)
        per_node: dict[Contact, list[int]] = defaultdict(list)
        outcome: dict[Any, bool] = {}
        local: list[int] = []
        for index, (slot, target, record) in enumerate(prepared):
            outcome.setdefault(slot, False)
            lookup = lookups[target]
            nearest = lookup.nearest_answered()
            me_first = [(self.node_id, "")] + nearest if not self.client_mode else nearest
            me_first.sort(key=lambda c: c[0] ^ target)
            for contact in me_first[: self.num_replicas]:
                if contact[0] == self.node_id:
                    local.append(index)
                    continue
                verdict = next((v for r, v in lookup.verdicts.get(contact[0], ()) if r is record), None)
                if verdict is None:
                    per_node[contact].append(index)
                elif verdict is True:
                    outcome[slot] = True
                else:
                    logger.debug("store of %r refused by %s: %s", slot, contact[1], verdict)
        for index in local:
            slot, _, record = prepared[index]
            outcome[slot] = self._store_local(record) is True or outcome[slot]

        async def send(contact: Contact, indices: list[int]) -> None:
            payload = {"from": self._me(), "records": [prepared[i][2].to_wire() for i in indices]}
            try:
                reply = await self.endpoint.call(contact[1], STORE, payload, timeout=self.rpc_timeout)
                verdicts = reply.get("ok") if isinstance(reply, dict) else None
                if not isinstance(verdicts, list) or len(verdicts) != len(indices):
                    raise ValueError("store reply must list one verdict per record")
            except (RPCError, ValueError) as e:
                logger.debug("store at %s failed: %s", contact[1], e)
                self.routing.mark_failed(contact[0])
                return
            for i, verdict in zip(indices, verdicts):
                if verdict is True:
                    outcome[prepared[i][0]] = True
                elif isinstance(verdict, str):
                    logger.debug("store of %r refused by %s: %s", prepared[i][0], contact[1], verdict)

        await asyncio.gather(*(send(c, idx) for c, idx in per_node.items()))
        return outcome

    async def get(self, key: Any, latest: bool = False) -> ValueWithExpiration | None:
        """The value under ``key``, or None. A key with subkeys gives ``{subkey: ValueWithExpiration}``.

        ``latest=True`` asks every one of the ``num_replicas`` nearest nodes (where stores land) and
        returns the newest version (and, for subkeys, the newest version of each subkey any of them holds).
        """
        return (await self.get_many([key], latest=latest))[key]

    async def lookup(self, key: Any, latest: bool = False) -> tuple[ValueWithExpiration | None, LookupStats]:
        """``get`` that also says how the lookup went (hops, requests), for measurements."""
        stats: dict[Any, LookupStats] = {}
        value = (await self.get_many([key], latest=latest, stats=stats))[key]
        return value, stats[key]

    async def get_many(
        self, keys: Iterable[Any], latest: bool = False, stats: dict[Any, "LookupStats"] | None = None
    ) -> dict[Any, ValueWithExpiration | None]:
        """``get`` for many keys; lookups are shared between keys. ``stats`` (if given) gets each key's
        :class:`LookupStats`."""
        keys = list(dict.fromkeys(keys))
        targets = {key: key_id(key) for key in keys}
        # Stores land on the ``num_replicas`` nearest nodes, so those hold the newest version: a latest
        # lookup settles once they have answered (and repairs any of them that lacked the value).
        beam = self.num_replicas if latest else None
        lookups = await self.find_nearest(list(targets.values()), want_values=True, latest=latest, beam_size=beam)
        results: dict[Any, ValueWithExpiration | None] = {}
        for key, target in targets.items():
            lookup = lookups[target]
            if stats is not None:
                stats[key] = LookupStats(lookup.hops, lookup.requests, len(lookup.answered))
            records = [r for r in lookup.result() if r.expiration_time > get_dht_time()]
            results[key] = self._decode(records)
            if records and self.cache_nearest:
                lacking = [c for c in lookup.nearest_answered() if c[0] not in lookup.holders][: self.cache_nearest]
                for contact in lacking:
                    self._spawn(self._cache_at(contact, records))
        return results

    async def _cache_at(self, contact: Contact, records: list[DHTRecord]) -> None:
        payload = {"from": self._me(), "records": [r.to_wire() for r in records]}
        try:
            await self.endpoint.call(contact[1], STORE, payload, timeout=self.rpc_timeout)
        except RPCError:
            self.routing.mark_failed(contact[0])

    def _decode(self, records: list[DHTRecord]) -> ValueWithExpiration | None:
        if not records:
            return None
        try:
            if records[0].subkey is None:
                record = records[0]
                return ValueWithExpiration(_unpack(self.validator.strip_value(record)), record.expiration_time)
            entries = {
                _unpack(r.subkey): ValueWithExpiration(_unpack(self.validator.strip_value(r)), r.expiration_time)
                for r in records
            }
        except (RecordRejected, ValueError, TypeError) as e:
            logger.debug("undecodable record: %s", e)
            return None
        return ValueWithExpiration(entries, max(r.expiration_time for r in records))

    # ------------------------------------------------------------------ maintenance

    async def _refresh_forever(self) -> None:
        """Look up a random id in every bucket that saw no traffic for ``refresh_period``."""
        while True:
            await asyncio.sleep(self.refresh_period / 2 * (0.5 + self.rng.random()))
            stale = self.routing.stale_buckets(self.refresh_period)
            if stale:
                targets = [random_id(b.low, b.high, self.rng) for b in stale]
                try:
                    await self.find_nearest(targets)
                except Exception:  # never let maintenance kill the node
                    logger.exception("bucket refresh failed")


class _Completions:
    """Tasks in the order they finish, for a lookup to handle as they come: one future per wait,
    where ``asyncio.wait`` would add and remove a callback on every running request each time."""

    __slots__ = ("done", "waiter")

    def __init__(self) -> None:
        self.done: list[asyncio.Task] = []
        self.waiter: asyncio.Future | None = None

    def add(self, task: asyncio.Task) -> None:
        self.done.append(task)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> list[asyncio.Task]:
        """The tasks finished since the last call, waiting for one if there are none yet."""
        if not self.done:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        done, self.done = self.done, []
        return done


def _pack(value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except TypeError as e:
        raise TypeError(f"DHT keys and values must be msgpack-serializable: {e}") from None


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:
        raise ValueError(f"undecodable DHT value: {e}") from None


def _key_slot(key: Any, subkey: Any) -> Any:
    return key if subkey is None else (key, subkey)
