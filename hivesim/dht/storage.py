"""A node's local storage: values with expiration, newest-wins, subkey dictionaries, bounded size.

Every stored value keeps the msgpack bytes of its key, subkey and value exactly as they arrived, so
a record can be re-validated (signatures cover those bytes) and handed on without re-encoding.
"""

from __future__ import annotations

import heapq
import time
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
    """What one key holds: a plain record, or a dictionary of records by subkey."""

    __slots__ = ("plain", "subkeys")

    def __init__(self) -> None:
        self.plain: DHTRecord | None = None
        self.subkeys: dict[bytes, DHTRecord] = {}

    @property
    def expiration_time(self) -> float:
        if self.plain is not None:
            return self.plain.expiration_time
        return max((r.expiration_time for r in self.subkeys.values()), default=float("-inf"))

    def records(self) -> Iterator[DHTRecord]:
        if self.plain is not None:
            yield self.plain
        yield from self.subkeys.values()


class LocalStorage:
    """Records by key id; the newest expiration wins, expired records are never returned.

    Args:
        max_bytes: total size kept; beyond it the records that expire soonest are evicted, so a flood of
            stores costs bounded memory.
        max_subkeys: most subkeys one key may hold.
    """

    def __init__(self, max_bytes: int = 256 << 20, max_subkeys: int = 4096) -> None:
        self.max_bytes = max_bytes
        self.max_subkeys = max_subkeys
        self.nbytes = 0
        self.records = 0  # live (or not yet dropped) records
        self._entries: dict[int, _Entry] = {}
        self._by_expiration: list[tuple[float, int, bytes | None]] = []  # lazy heap: may hold stale items

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[int]:
        return list(self._entries)

    def store(self, key_id: int, record: DHTRecord) -> bool:
        """Store ``record`` unless what is there expires later (or at the same time); True if stored."""
        now = get_dht_time()
        if record.expiration_time <= now:
            return False
        self._drop_expired(now)
        entry = self._entries.get(key_id)
        if entry is None:
            entry = self._entries[key_id] = _Entry()
        if record.subkey is None:
            if entry.plain is None and not entry.subkeys or record.expiration_time > entry.expiration_time:
                self._clear(entry)
                entry.plain = record
            else:
                return self._forget_if_empty(key_id, entry)
        else:
            if entry.plain is not None:
                if record.expiration_time <= entry.plain.expiration_time:
                    return False
                self._clear(entry)
            current = entry.subkeys.get(record.subkey)
            if current is not None and record.expiration_time <= current.expiration_time:
                return False
            if current is None and len(entry.subkeys) >= self.max_subkeys:
                return self._forget_if_empty(key_id, entry)
            if current is not None:
                self.nbytes -= current.nbytes
                self.records -= 1
            entry.subkeys[record.subkey] = record
        self.nbytes += record.nbytes
        self.records += 1
        heapq.heappush(self._by_expiration, (record.expiration_time, key_id, record.subkey))
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

    def _clear(self, entry: _Entry) -> None:
        for record in entry.records():
            self.nbytes -= record.nbytes
            self.records -= 1
        entry.plain = None
        entry.subkeys = {}

    def _forget_if_empty(self, key_id: int, entry: _Entry) -> bool:
        if entry.plain is None and not entry.subkeys:
            del self._entries[key_id]
        return False

    def _remove(self, key_id: int, subkey: bytes | None, expiration: float) -> None:
        entry = self._entries.get(key_id)
        if entry is None:
            return
        record = entry.plain if subkey is None else entry.subkeys.get(subkey)
        if record is None or record.expiration_time != expiration:
            return  # the heap item is stale: this slot was overwritten since
        self.nbytes -= record.nbytes
        self.records -= 1
        if subkey is None:
            entry.plain = None
        else:
            del entry.subkeys[subkey]
        self._forget_if_empty(key_id, entry)

    def _drop_expired(self, now: float) -> None:
        heap = self._by_expiration
        while heap and heap[0][0] <= now:
            expiration, key_id, subkey = heapq.heappop(heap)
            self._remove(key_id, subkey, expiration)
        if len(heap) > 2 * self.records + 1024:  # overwritten records leave stale heap items
            self._rebuild_heap()

    def _evict(self) -> None:
        """Over budget: drop the records that expire soonest (possibly the one just stored)."""
        heap = self._by_expiration
        while self.nbytes > self.max_bytes and heap:
            expiration, key_id, subkey = heapq.heappop(heap)
            self._remove(key_id, subkey, expiration)

    def _holds(self, key_id: int, record: DHTRecord) -> bool:
        entry = self._entries.get(key_id)
        if entry is None:
            return False
        return (entry.plain if record.subkey is None else entry.subkeys.get(record.subkey)) is record

    def all_records(self) -> Iterator[tuple[int, DHTRecord]]:
        for key_id, entry in self._entries.items():
            for record in entry.records():
                yield key_id, record

    def _rebuild_heap(self) -> None:
        self._by_expiration = [(r.expiration_time, key_id, r.subkey) for key_id, r in self.all_records()]
        heapq.heapify(self._by_expiration)
