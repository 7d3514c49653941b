"""Kademlia routing: 160-bit ids, XOR distance, k-buckets that split, dead-contact replacement.

Ids are plain Python ints in ``[0, 2**160)``. The table is a list of buckets covering the id space; a
full bucket splits when its range holds our own id (Kademlia's rule), or when its depth is not a
multiple of ``depth_modulo`` (the paper's relaxation that keeps lookups short in skewed tables).
Otherwise newcomers wait in the bucket's replacement cache and take the place of a contact that
stops answering. A contact that failed is also blacklisted for a backoff that doubles per failure, so
lookups do not keep hammering a dead peer.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict
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
    """

    def __init__(
        self,
        node_id: int,
        bucket_size: int = 20,
        depth_modulo: int = 5,
        max_failures: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.node_id = node_id
        self.bucket_size = bucket_size
        self.depth_modulo = depth_modulo
        self.max_failures = max_failures
        self.backoff = backoff
        self.buckets: list[KBucket] = [KBucket(0, MAX_ID, bucket_size)]
        self.failures: dict[int, int] = {}
        self.banned_until: dict[int, float] = {}

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

    def add_or_update(self, node_id: int, address: str) -> int | None:
        """Record that ``node_id`` answered at ``address``.

        Returns the id of the least-recently-seen contact of a full bucket (worth a ping: if it is
        dead, the newcomer takes its place from the replacement cache), or None.
        """
        if node_id == self.node_id:
            return None
        self.failures.pop(node_id, None)
        self.banned_until.pop(node_id, None)
        while True:
            bucket = self.bucket_for(node_id)
            bucket.last_updated = time.monotonic()
            if node_id in bucket.nodes:
                bucket.nodes[node_id] = address
                bucket.nodes.move_to_end(node_id)
                return None
            if len(bucket.nodes) < bucket.size:
                bucket.nodes[node_id] = address
                bucket.replacements.pop(node_id, None)
                return None
            if bucket.covers(self.node_id) or bucket.depth % self.depth_modulo != 0:
                self._split(bucket)
                continue
            bucket.replacements[node_id] = address
            bucket.replacements.move_to_end(node_id)
            while len(bucket.replacements) > bucket.size:
                bucket.replacements.popitem(last=False)
            return next(iter(bucket.nodes))

    def _split(self, bucket: KBucket) -> None:
        index = self.buckets.index(bucket)
        self.buckets[index : index + 1] = list(bucket.split())

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
        bucket.replacements.pop(node_id, None)
        if bucket.nodes.pop(node_id, None) is None:
            return False
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

    def nearest(self, target: int, count: int, exclude: int | None = None) -> list[tuple[int, str]]:
        """The ``count`` known contacts closest to ``target`` by XOR distance (banned ones last)."""
        contacts = [(nid, addr) for bucket in self.buckets for nid, addr in bucket.nodes.items() if nid != exclude]
        if self.banned_until:
            contacts.sort(key=lambda c: (self.is_banned(c[0]), c[0] ^ target))
        else:
            contacts.sort(key=lambda c: c[0] ^ target)
        return contacts[:count]

    def stale_buckets(self, older_than: float) -> list[KBucket]:
        cutoff = time.monotonic() - older_than
        return [b for b in self.buckets if b.last_updated < cutoff]
