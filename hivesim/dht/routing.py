"""Kademlia routing: 160-bit ids, XOR distance, k-buckets that split, dead-contact replacement.

Ids are plain Python ints in ``[0, 2**160)``. The table is a list of buckets covering the id space; a
full bucket splits when its range holds our own id (Kademlia's rule), or when its depth is not a
multiple of ``depth_modulo`` (the paper's relaxation that keeps lookups short in skewed tables).
Otherwise newcomers wait in the bucket's replacement cache and take the place of a contact that
stops answering. A contact that failed is also blacklisted for a backoff that doubles per failure, so
lookups do not keep hammering a dead peer. A full bucket asks for its oldest contact to be checked at
most once per ``probe_interval``: in a large swarm most callers do not fit their callee's table, and
checking on every such call would add a ping to most requests (failed requests find dead contacts anyway).

Ids are cheap to make up, so one machine must not be able to fill the table: at most ``max_per_ip``
contacts (2) may share one public IP address and ``max_per_subnet`` (8) one IPv4 /24 or IPv6 /64, the
replacement caches included. Addresses on loopback, private or link-local networks (tests, simulations and
clusters that run many peers per host) and host names are bounded per ``host:port`` instead, with no
subnet bound; ``local_by_port=False`` applies the IP bounds to them too. ``None`` turns a bound off.

:meth:`RoutingTable.nearest` walks the buckets outward from the target (the buckets are the leaves of a
binary trie, and a depth-first walk that enters the target's side first meets them in order of XOR
distance), so its cost depends on the contacts it returns, not on the size of the table.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgpack

ID_BITS = 160
ID_BYTES = ID_BITS // 8
MAX_ID = 1 << ID_BITS


def key_id(key: object) -> int:
    """The DHT id of a key: 160 bits of SHA-256 over its msgpack form."""
    return id_of_key_bytes(msgpack.packb(key, use_bin_type=True))


def id_of_key_bytes(key_bytes: bytes) -> int:
    """The DHT id of a key given as its msgpack bytes (how keys travel and are stored)."""
    return int.from_bytes(hashlib.sha256(key_bytes).digest()[:ID_BYTES], "big")


def id_from_bytes(data: bytes) -> int:
    if len(data) != ID_BYTES:
        raise ValueError(f"a DHT id is {ID_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data, "big")


def id_to_bytes(node_id: int) -> bytes:
    return node_id.to_bytes(ID_BYTES, "big")


def random_id(low: int = 0, high: int = MAX_ID, rng: random.Random | None = None) -> int:
    return (rng or random).randrange(low, high)


@functools.lru_cache(maxsize=65536)
def address_groups(address: str, local_by_port: bool = True) -> tuple[str, str | None]:
    """(per-address group, subnet group or None) of a peer address, for the per-IP bounds.

    A public IP literal groups by the IP and by its /24 (IPv4) or /64 (IPv6). Loopback, private and
    link-local IPs (when ``local_by_port``) and host names group by ``host:port`` and have no subnet group:
    many honest peers share such hosts, and a name says nothing about the machine behind it.
    """
    rest = address[6:] if address.startswith("tcp://") else address
    rest = rest.split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}", None
    if local_by_port and (ip.is_loopback or ip.is_private or ip.is_link_local):
        return f"{ip}:{port}", None
    if ip.version == 4:
        return str(ip), str(ipaddress.ip_network(f"{ip}/24", strict=False))
    return str(ip), str(ipaddress.ip_network(f"{ip}/64", strict=False))


@dataclass
class KBucket:
    """Contacts whose ids fall in ``[low, high)``, least recently seen first."""

    low: int
    high: int
    size: int
    depth: int = 0
    nodes: OrderedDict[int, str] = field(default_factory=OrderedDict)
    replacements: OrderedDict[int, str] = field(default_factory=OrderedDict)
    last_updated: float = field(default_factory=time.monotonic)
    last_probed: float = float("-inf")  # when add_or_update last asked for the oldest contact to be checked

    def covers(self, node_id: int) -> bool:
        return self.low <= node_id < self.high

    def split(self) -> tuple["KBucket", "KBucket"]:
        middle = (self.low + self.high) // 2
        left = KBucket(self.low, middle, self.size, self.depth + 1, last_updated=self.last_updated)
        right = KBucket(middle, self.high, self.size, self.depth + 1, last_updated=self.last_updated)
        for source, kind in ((self.nodes, "nodes"), (self.replacements, "replacements")):
            for node_id, address in source.items():
                getattr(left if node_id < middle else right, kind)[node_id] = address
        return left, right


class RoutingTable:
    """The contacts one node knows, organised in k-buckets around its own id.

    Args:
        node_id: our own id.
        bucket_size: k, contacts per bucket.
        depth_modulo: also split buckets whose depth is not a multiple of this (Kademlia §4.2).
        max_failures: consecutive failed RPCs after which a contact is dropped.
        backoff: first blacklist period (seconds) after a failure; doubles per failure, capped at 60 s.
        max_per_ip, max_per_subnet, local_by_port: how many contacts one address or subnet may hold
            (see the module docstring); None turns a bound off.
        probe_interval: a full bucket asks for its oldest contact to be checked at most this often (s).
    """

    def __init__(
        self,
        node_id: int,
        bucket_size: int = 20,
        depth_modulo: int = 5,
        max_failures: int = 3,
        backoff: float = 0.5,
        max_per_ip: int | None = 2,
        max_per_subnet: int | None = 8,
        local_by_port: bool = True,
        probe_interval: float = 5.0,
    ) -> None:
        self.node_id = node_id
        self.probe_interval = probe_interval
        self.bucket_size = bucket_size
        self.depth_modulo = depth_modulo
        self.max_failures = max_failures
        self.backoff = backoff
        self.max_per_ip = max_per_ip
        self.max_per_subnet = max_per_subnet
        self.local_by_port = local_by_port
        self.buckets: list[KBucket] = [KBucket(0, MAX_ID, bucket_size)]
        self._lows: list[int] = [0]  # each bucket's low end, for bisecting
        self.failures: dict[int, int] = {}
        self.banned_until: dict[int, float] = {}
        self._per_ip: Counter[str] = Counter()  # contacts (kept or waiting) per address group
        self._per_subnet: Counter[str] = Counter()
        self.refused_by_bounds = 0  # contacts turned away because their address or subnet was full

    def __len__(self) -> int:
        return sum(len(b.nodes) for b in self.buckets)

    def __contains__(self, node_id: int) -> bool:
        return node_id in self.bucket_for(node_id).nodes

    def bucket_for(self, node_id: int) -> KBucket:
        lo, hi = 0, len(self.buckets) - 1
        while lo < hi:  # buckets are sorted and contiguous: binary search by range
            mid = (lo + hi) // 2
            if node_id < self.buckets[mid].high:
                hi = mid
            else:
                lo = mid + 1
        return self.buckets[lo]

    def address_of(self, node_id: int) -> str | None:
        return self.bucket_for(node_id).nodes.get(node_id)

    def has_room(self, node_id: int) -> bool:
        """Whether ``node_id`` would enter the table now: it is in it, or its bucket has room or would split."""
        bucket = self.bucket_for(node_id)
        return node_id in bucket.nodes or len(bucket.nodes) < bucket.size or self._may_split(bucket)

    def _may_split(self, bucket: KBucket) -> bool:
        """A full bucket splits when it holds our own id, or when its depth is not a multiple of depth_modulo."""
        return bucket.covers(self.node_id) or bucket.depth % self.depth_modulo != 0

    def waiting_at(self, node_id: int) -> str | None:
        """Where ``node_id`` waits in its bucket's replacement cache (it answered there), or None."""
        return self.bucket_for(node_id).replacements.get(node_id)

    def add_or_update(self, node_id: int, address: str) -> int | None:
        """Record that ``node_id`` answered at ``address``.

        Returns the id of the least-recently-seen contact of a full bucket (worth a ping: if it is
        dead, the newcomer takes its place from the replacement cache; at most once per
        ``probe_interval`` per bucket), or None. A contact whose
        address or subnet already holds its share of the table is not added (see the module docstring).
        """
        if node_id == self.node_id:
            return None
        while True:
            bucket = self.bucket_for(node_id)
            if node_id in bucket.nodes:
                if bucket.nodes[node_id] != address and not self._move(bucket.nodes[node_id], address):
                    return None
                self._forgive(node_id)
                bucket.last_updated = time.monotonic()
                bucket.nodes[node_id] = address
                bucket.nodes.move_to_end(node_id)
                return None
            waiting = bucket.replacements.get(node_id)
            if waiting is None and not self._admit(address):
                self.refused_by_bounds += 1
                return None
            if waiting is not None and waiting != address and not self._move(waiting, address):
                return None
            self._forgive(node_id)
            bucket.last_updated = time.monotonic()
            if len(bucket.nodes) < bucket.size:
                bucket.nodes[node_id] = address
                bucket.replacements.pop(node_id, None)
                return None
            if self._may_split(bucket):
                self._split(bucket)
                continue
            bucket.replacements[node_id] = address
            bucket.replacements.move_to_end(node_id)
            while len(bucket.replacements) > bucket.size:
                self._release(bucket.replacements.popitem(last=False)[1])
            now = time.monotonic()
            if now - bucket.last_probed < self.probe_interval:
                return None
            bucket.last_probed = now
            return next(iter(bucket.nodes))

    def _forgive(self, node_id: int) -> None:
        self.failures.pop(node_id, None)
        self.banned_until.pop(node_id, None)

    def _admit(self, address: str) -> bool:
        """Count one more contact at ``address`` if its address and subnet have room."""
        group, subnet = address_groups(address, self.local_by_port)
        if self.max_per_ip is not None and self._per_ip[group] >= self.max_per_ip:
            return False
        if subnet is not None and self.max_per_subnet is not None and self._per_subnet[subnet] >= self.max_per_subnet:
            return False
        self._per_ip[group] += 1
        if subnet is not None:
            self._per_subnet[subnet] += 1
        return True

    def _release(self, address: str) -> None:
        group, subnet = address_groups(address, self.local_by_port)
        self._per_ip[group] -= 1
        if self._per_ip[group] <= 0:
            del self._per_ip[group]
        if subnet is not None:
            self._per_subnet[subnet] -= 1
            if self._per_subnet[subnet] <= 0:
                del self._per_subnet[subnet]

    def _move(self, old: str, new: str) -> bool:
        """A known contact now answers at ``new``: move its count there, if ``new`` has room."""
        if address_groups(old, self.local_by_port) == address_groups(new, self.local_by_port):
            return True
        if not self._admit(new):
            self.refused_by_bounds += 1
            return False
        self._release(old)
        return True

    def _split(self, bucket: KBucket) -> None:
        index = self.buckets.index(bucket)
        self.buckets[index : index + 1] = list(bucket.split())
        self._lows = [b.low for b in self.buckets]

    def mark_failed(self, node_id: int) -> bool:
        """Count a failed RPC; blacklist with backoff; drop the contact after ``max_failures``.

        Returns True if the contact was dropped (and replaced from the cache, if one was waiting).
        """
        count = self.failures.get(node_id, 0) + 1
        self.failures[node_id] = count
        self.banned_until[node_id] = time.monotonic() + min(60.0, self.backoff * 2 ** (count - 1))
        if count < self.max_failures:
            return False
        return self.remove(node_id)

    def remove(self, node_id: int) -> bool:
        bucket = self.bucket_for(node_id)
        waiting = bucket.replacements.pop(node_id, None)
        if waiting is not None:
            self._release(waiting)
        address = bucket.nodes.pop(node_id, None)
        if address is None:
            return False
        self._release(address)
        if bucket.replacements:
            newcomer, address = bucket.replacements.popitem(last=True)
            bucket.nodes[newcomer] = address
        return True

    def is_banned(self, node_id: int) -> bool:
        until = self.banned_until.get(node_id)
        if until is None:
            return False
        if until <= time.monotonic():
            del self.banned_until[node_id]
            return False
        return True

    def buckets_by_distance(self, target: int) -> Iterator[KBucket]:
        """The buckets in order of XOR distance from ``target``: every id in a bucket is nearer to
        ``target`` than every id in the buckets after it. A depth-first walk of the trie whose leaves
        the buckets are (they are aligned power-of-two ranges), nearer half first."""
        buckets, lows = self.buckets, self._lows
        stack = [(0, len(buckets), 0, MAX_ID)]
        while stack:
            i, j, low, high = stack.pop()
            if j - i == 1:
                yield buckets[i]
                continue
            half = (high - low) >> 1
            mid = low + half
            k = bisect.bisect_left(lows, mid, i, j)
            lower, upper = (i, k, low, mid), (k, j, mid, high)
            if target & half:  # the target's bit here is 1: the upper half is nearer
                stack.append(lower)
                stack.append(upper)
            else:
                stack.append(upper)
                stack.append(lower)

    def nearest(self, target: int, count: int, exclude: int | None = None) -> list[tuple[int, str]]:
        """The ``count`` known contacts closest to ``target`` by XOR distance (banned ones last).

        Looks at the nearest buckets only, so a find for many keys costs no more on a large table."""
        good: list[tuple[int, str]] = []
        banned: list[tuple[int, str]] = []
        check = bool(self.banned_until)
        for bucket in self.buckets_by_distance(target):
            if not bucket.nodes:
                continue
            for contact in sorted(bucket.nodes.items(), key=lambda c: c[0] ^ target):
                if contact[0] == exclude:
                    continue
                (banned if check and self.is_banned(contact[0]) else good).append(contact)
            if len(good) >= count:
                return good[:count]
        return (good + banned)[:count]

    def stale_buckets(self, older_than: float) -> list[KBucket]:
        cutoff = time.monotonic() - older_than
        return [b for b in self.buckets if b.last_updated < cutoff]
