"""A node's local storage: values with expiration, newest-wins, subkey dictionaries, bounded size.

Every stored value keeps the msgpack bytes of its key, subkey and value exactly as they arrived, so
a record can be re-validated (signatures cover those bytes) and handed on without re-encoding.

Outsiders write here, so nothing a writer sends may take the storage away from the others:

* **a maximum lifetime**: a record expiring later than ``now + max_ttl`` (plus ``max_clock_skew``) is
  refused; otherwise one store with expiration 1e300 would win "newest wins" forever;
* **owned subkeys stay**: a plain record nobody owns never replaces a key's owned subkeys (those whose
  subkey names an ``[owner:...]``), and an owned subkey replaces an unowned plain record;
* **per-writer quotas**: every record is charged to its *writer* (the peer whose connection sent it,
  see :class:`~hivesim.dht.node.DHTNode`); one writer holds at most ``max_subkeys_per_writer`` subkeys
  of a key and ``max_bytes_per_writer`` bytes in all (beyond, its own soonest-expiring records go);
* **fair eviction**: over ``max_bytes``, and in a key that holds ``max_subkeys``, records are taken
  from the writer that holds the most, so a flood evicts the flooder's own records first.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from typing import Generic, Iterator, NamedTuple, TypeVar

T = TypeVar("T")


def get_dht_time() -> float:
    """The clock of DHT expirations: wall-clock seconds, so peers on different hosts agree."""
    return time.time()


class ValueWithExpiration(NamedTuple, Generic[T]):
    """A value read from the DHT and the absolute time (``get_dht_time()``) it expires at."""

    value: T
    expiration_time: float


class DHTRecord(NamedTuple):
    """One stored item as it travels: msgpack bytes of key, subkey (None for a plain value) and value.

    A named tuple (immutable, like a frozen dataclass, but several times cheaper to build: every find
    reply builds one per record it carries)."""

    key: bytes
    subkey: bytes | None
    value: bytes
    expiration_time: float

    def to_wire(self) -> list:
        return [self.key, self.subkey, self.value, self.expiration_time]

    @property
    def nbytes(self) -> int:
        return len(self.key) + len(self.subkey or b"") + len(self.value) + 64


class _Entry:
    """What one key holds: a plain record, or a dictionary of records by subkey, each with its writer."""

    __slots__ = ("plain", "plain_writer", "subkeys", "writers", "per_writer", "owned")

    def __init__(self) -> None:
        self.plain: DHTRecord | None = None
        self.plain_writer: bytes = b""
        self.subkeys: dict[bytes, DHTRecord] = {}
        self.writers: dict[bytes, bytes] = {}  # subkey -> writer
        self.per_writer: Counter[bytes] = Counter()  # subkeys held per writer
        self.owned = 0  # subkeys that name an owner

    @property
    def expiration_time(self) -> float:
        if self.plain is not None:
            return self.plain.expiration_time
        return max((r.expiration_time for r in self.subkeys.values()), default=float("-inf"))

    def records(self) -> Iterator[DHTRecord]:
        if self.plain is not None:
            yield self.plain
        yield from self.subkeys.values()

    def writer_of(self, subkey: bytes | None) -> bytes:
        return self.plain_writer if subkey is None else self.writers[subkey]


def is_owned(record: DHTRecord) -> bool:
    """Whether the record's key or subkey names an owner (its signature is the validator's business)."""
    from hivesim.dht.validation import owners_of  # validation imports this module

    return bool(owners_of(record))


class LocalStorage:
    """Records by key id; the newest expiration wins, expired records are never returned.

    Args:
        max_bytes: total size kept; beyond it records are evicted from the writer holding the most bytes
            (its soonest-expiring first), so a flood costs bounded memory and evicts the flooder first.
        max_subkeys: most subkeys one key may hold; a full key makes room for a writer holding fewer of
            its subkeys by evicting one of the writer that holds the most.
        max_ttl: seconds from now beyond which an expiration is refused (24 h).
        max_clock_skew: allowance on top of ``max_ttl`` for writers whose clocks run ahead.
        max_subkeys_per_writer: most subkeys of one key one writer may hold.
        max_bytes_per_writer: most bytes one writer may hold here (default: an eighth of ``max_bytes``).
    """

    def __init__(
        self,
        max_bytes: int = 256 << 20,
        max_subkeys: int = 4096,
        *,
        max_ttl: float = 24 * 3600.0,
        max_clock_skew: float = 60.0,
        max_subkeys_per_writer: int = 1024,
        max_bytes_per_writer: int | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_subkeys = max_subkeys
        self.max_ttl = max_ttl
        self.max_clock_skew = max_clock_skew
        self.max_subkeys_per_writer = max_subkeys_per_writer
        self.max_bytes_per_writer = max_bytes_per_writer if max_bytes_per_writer is not None else max(1, max_bytes // 8)
        self.nbytes = 0
        self.records = 0  # live (or not yet dropped) records
        self.refused = Counter()  # why stores were refused: "ttl", "owned", "quota"
        self._entries: dict[int, _Entry] = {}
        self._by_expiration: list[tuple[float, int, bytes | None]] = []  # lazy heap: may hold stale items
        self._writer_bytes: Counter[bytes] = Counter()
        self._writer_heaps: dict[bytes, list[tuple[float, int, bytes | None]]] = {}  # lazy, per writer
        self._largest: list[tuple[int, bytes]] = []  # lazy max-heap of (-bytes, writer)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[int]:
        return list(self._entries)

    def latest_allowed(self, now: float | None = None) -> float:
        """The latest expiration this storage accepts (now + ``max_ttl`` + ``max_clock_skew``)."""
        return (get_dht_time() if now is None else now) + self.max_ttl + self.max_clock_skew

    def bytes_of(self, writer: bytes) -> int:
        """Bytes held for ``writer``."""
        return self._writer_bytes.get(writer, 0)

    def store(self, key_id: int, record: DHTRecord, writer: bytes = b"") -> bool:
        """Store ``record`` for ``writer`` unless what is there expires later (or at the same time), its
        expiration is too far ahead, or it would wipe owned subkeys; True if stored."""
        now = get_dht_time()
        if record.expiration_time <= now:
            return False
        if record.expiration_time > self.latest_allowed(now):
            self.refused["ttl"] += 1
            return False
        self._drop_expired(now)
        entry = self._entries.get(key_id)
        if entry is None:
            entry = self._entries[key_id] = _Entry()
        if record.subkey is None:
            if entry.owned and not is_owned(record):
                self.refused["owned"] += 1  # a plain record nobody owns never erases owned subkeys
                return self._forget_if_empty(key_id, entry)
            if entry.plain is None and not entry.subkeys or record.expiration_time > entry.expiration_time:
                self._clear(key_id, entry)
                entry.plain, entry.plain_writer = record, writer
            else:
                return self._forget_if_empty(key_id, entry)
        else:
            owned = is_owned(record)
            if entry.plain is not None:
                if record.expiration_time <= entry.plain.expiration_time and not (owned and not is_owned(entry.plain)):
                    return False
                self._clear(key_id, entry)
            current = entry.subkeys.get(record.subkey)
            if current is not None and record.expiration_time <= current.expiration_time:
                return False
            if current is None and not self._room_for_subkey(key_id, entry, writer):
                self.refused["quota"] += 1
                return self._forget_if_empty(key_id, entry)
            if current is not None:
                self._uncharge(entry, record.subkey, current)
            entry.subkeys[record.subkey] = record
            entry.writers[record.subkey] = writer
            entry.per_writer[writer] += 1
            entry.owned += owned
        self.nbytes += record.nbytes
        self.records += 1
        self._charge(writer, record.nbytes)
        item = (record.expiration_time, key_id, record.subkey)
        heapq.heappush(self._by_expiration, item)
        heapq.heappush(self._writer_heaps.setdefault(writer, []), item)
        while self._writer_bytes.get(writer, 0) > self.max_bytes_per_writer and self._evict_one(writer):
            pass
        self._evict()
        return self._holds(key_id, record)

    def get(self, key_id: int) -> list[DHTRecord]:
        """The live records of a key: one plain record, or one per subkey; [] if none."""
        entry = self._entries.get(key_id)
        if entry is None:
            return []
        now = get_dht_time()
        if entry.expiration_time <= now:
            self._drop_expired(now)
            entry = self._entries.get(key_id)
            if entry is None:
                return []
        return [r for r in entry.records() if r.expiration_time > now]

    # ------------------------------------------------------------------ accounting

    def _room_for_subkey(self, key_id: int, entry: _Entry, writer: bytes) -> bool:
        """Whether ``writer`` may add a subkey to ``entry``, evicting the top writer's if the key is full."""
        mine = entry.per_writer.get(writer, 0)
        if mine >= self.max_subkeys_per_writer:
            return False
        if len(entry.subkeys) < self.max_subkeys:
            return True
        top, most = max(entry.per_writer.items(), key=lambda kv: kv[1])
        if most <= mine + 1:
            return False  # evicting would only even out equals
        victim = min((s for s, w in entry.writers.items() if w == top), key=lambda s: entry.subkeys[s].expiration_time)
        record = entry.subkeys[victim]
        self._remove(key_id, victim, record.expiration_time)
        return True

    def _charge(self, writer: bytes, nbytes: int) -> None:
        total = self._writer_bytes[writer] = self._writer_bytes.get(writer, 0) + nbytes
        heapq.heappush(self._largest, (-total, writer))

    def _uncharge(self, entry: _Entry, subkey: bytes | None, record: DHTRecord) -> None:
        """Take ``record`` (held in ``entry``) off its writer's and the storage's accounts."""
        writer = entry.writer_of(subkey)
        left = self._writer_bytes.get(writer, 0) - record.nbytes
        if left > 0:
            self._writer_bytes[writer] = left
            heapq.heappush(self._largest, (-left, writer))
        else:
            self._writer_bytes.pop(writer, None)
            self._writer_heaps.pop(writer, None)
        if subkey is not None:
            entry.per_writer[writer] -= 1
            if entry.per_writer[writer] <= 0:
                del entry.per_writer[writer]
            entry.owned -= is_owned(record)
        self.nbytes -= record.nbytes
        self.records -= 1

    def _clear(self, key_id: int, entry: _Entry) -> None:
        if entry.plain is not None:
            self._uncharge(entry, None, entry.plain)
        for subkey, record in entry.subkeys.items():
            self._uncharge(entry, subkey, record)
        entry.plain = None
        entry.plain_writer = b""
        entry.subkeys = {}
        entry.writers = {}
        entry.per_writer = Counter()
        entry.owned = 0

    def _forget_if_empty(self, key_id: int, entry: _Entry) -> bool:
        if entry.plain is None and not entry.subkeys:
            del self._entries[key_id]
        return False

    def _remove(self, key_id: int, subkey: bytes | None, expiration: float, writer: bytes | None = None) -> bool:
        """Drop the record at (key, subkey) if it still expires at ``expiration`` (and, if given, belongs
        to ``writer``); False if that heap item was stale."""
        entry = self._entries.get(key_id)
        if entry is None:
            return False
        record = entry.plain if subkey is None else entry.subkeys.get(subkey)
        if record is None or record.expiration_time != expiration:
            return False  # the heap item is stale: this slot was overwritten since
        if writer is not None and entry.writer_of(subkey) != writer:
            return False
        self._uncharge(entry, subkey, record)
        if subkey is None:
            entry.plain = None
            entry.plain_writer = b""
        else:
            del entry.subkeys[subkey]
            del entry.writers[subkey]
        self._forget_if_empty(key_id, entry)
        return True

    def _drop_expired(self, now: float) -> None:
        heap = self._by_expiration
        while heap and heap[0][0] <= now:
            expiration, key_id, subkey = heapq.heappop(heap)
            self._remove(key_id, subkey, expiration)
        if len(heap) > 2 * self.records + 1024 or len(self._largest) > 4 * len(self._writer_bytes) + 1024:
            self._rebuild_heaps()  # overwritten records and changed totals leave stale heap items

    def _evict_one(self, writer: bytes) -> bool:
        """Drop ``writer``'s soonest-expiring record; False if it holds none."""
        heap = self._writer_heaps.get(writer)
        while heap:
            expiration, key_id, subkey = heapq.heappop(heap)
            if self._remove(key_id, subkey, expiration, writer):
                return True
        self._writer_heaps.pop(writer, None)
        return False

    def _largest_writer(self) -> bytes | None:
        heap = self._largest
        while heap:
            negative, writer = heap[0]
            if self._writer_bytes.get(writer) == -negative:
                return writer
            heapq.heappop(heap)  # stale: that writer's total has changed since
        return None

    def _evict(self) -> None:
        """Over budget: drop records of the writer that holds the most bytes (its soonest-expiring first),
        so whoever floods the node pays for it, not the writers that hold little."""
        while self.nbytes > self.max_bytes:
            writer = self._largest_writer()
            if writer is None or not self._evict_one(writer):
                break

    def _holds(self, key_id: int, record: DHTRecord) -> bool:
        entry = self._entries.get(key_id)
        if entry is None:
            return False
        return (entry.plain if record.subkey is None else entry.subkeys.get(record.subkey)) is record

    def all_records(self) -> Iterator[tuple[int, DHTRecord]]:
        for key_id, entry in self._entries.items():
            for record in entry.records():
                yield key_id, record

    def _rebuild_heaps(self) -> None:
        self._by_expiration = []
        self._writer_heaps = {}
        for key_id, entry in self._entries.items():
            if entry.plain is not None:
                item = (entry.plain.expiration_time, key_id, None)
                self._by_expiration.append(item)
                self._writer_heaps.setdefault(entry.plain_writer, []).append(item)
            for subkey, record in entry.subkeys.items():
                item = (record.expiration_time, key_id, subkey)
                self._by_expiration.append(item)
                self._writer_heaps.setdefault(entry.writers[subkey], []).append(item)
        heapq.heapify(self._by_expiration)
        for heap in self._writer_heaps.values():
            heapq.heapify(heap)
        self._largest = [(-total, writer) for writer, total in self._writer_bytes.items()]
        heapq.heapify(self._largest)
