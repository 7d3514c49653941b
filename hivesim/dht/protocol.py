"""The DHT's RPCs on the wire: ping, store and find, with strict checks on what peers send.

Requests and replies are plain msgpack structures (see :mod:`hivesim.net.serialization`):

- ``dht.ping``  ``{"from": peer}`` -> ``{"from": peer}``
- ``dht.store`` ``{"from": peer, "records": [[key, subkey|None, value, expiration], ...]}``
  -> ``{"from": peer, "ok": [True | "reason", ...]}``
- ``dht.find``  ``{"from": peer, "keys": [key_id, ...], "values": bool}``
  -> ``{"from": peer, "found": [[records, nearest], ...]}`` with ``nearest = [[node_id, address], ...]``

``peer`` is ``[node_id (20 bytes), address]``, or None for a client-mode node, which is then never
added to anyone's routing table. Anything malformed raises ``ValueError`` in the handler, which the
caller receives as a ``RemoteError``; the node keeps serving.
"""

from __future__ import annotations

import math
from typing import Any

from hivesim.dht.routing import ID_BYTES
from hivesim.dht.storage import DHTRecord

PING, STORE, FIND = "dht.ping", "dht.store", "dht.find"

MAX_ADDRESS_BYTES = 256


class Limits:
    """Sizes a node accepts from peers."""

    def __init__(
        self,
        max_key_bytes: int = 4096,
        max_value_bytes: int = 1 << 20,
        max_records_per_request: int = 4096,
        max_keys_per_request: int = 4096,
    ) -> None:
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes
        self.max_records_per_request = max_records_per_request
        self.max_keys_per_request = max_keys_per_request


def parse_peer(value: Any) -> tuple[int, str] | None:
    """``[node_id, address]`` -> (id, address); None stays None (a client-mode caller)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("peer must be [node_id, address]")
    node_id, address = value
    if not isinstance(node_id, bytes) or len(node_id) != ID_BYTES:
        raise ValueError(f"node id must be {ID_BYTES} bytes")
    if not isinstance(address, str) or not address.startswith("tcp://") or len(address) > MAX_ADDRESS_BYTES:
        raise ValueError("peer address must be a tcp:// address")
    return int.from_bytes(node_id, "big"), address


def parse_records(value: Any, limits: Limits) -> list[DHTRecord]:
    if not isinstance(value, list):
        raise ValueError("records must be a list")
    if len(value) > limits.max_records_per_request:
        raise ValueError(f"at most {limits.max_records_per_request} records per request")
    return [parse_record(item, limits) for item in value]


def parse_record(item: Any, limits: Limits) -> DHTRecord:
    if not isinstance(item, list) or len(item) != 4:
        raise ValueError("a record is [key, subkey, value, expiration]")
    key, subkey, value, expiration = item
    if not isinstance(key, bytes) or not 0 < len(key) <= limits.max_key_bytes:
        raise ValueError(f"record key must be 1..{limits.max_key_bytes} bytes")
    if subkey is not None and (not isinstance(subkey, bytes) or not 0 < len(subkey) <= limits.max_key_bytes):
        raise ValueError(f"record subkey must be None or 1..{limits.max_key_bytes} bytes")
    if not isinstance(value, bytes) or len(value) > limits.max_value_bytes:
        raise ValueError(f"record value must be at most {limits.max_value_bytes} bytes")
    if isinstance(expiration, bool) or not isinstance(expiration, (int, float)) or not math.isfinite(expiration):
        raise ValueError("record expiration must be a finite number")
    return DHTRecord(key, subkey, value, float(expiration))


def parse_key_ids(value: Any, limits: Limits) -> list[int]:
    if not isinstance(value, list) or len(value) > limits.max_keys_per_request:
        raise ValueError(f"keys must be a list of at most {limits.max_keys_per_request} ids")
    if not all(isinstance(k, bytes) and len(k) == ID_BYTES for k in value):
        raise ValueError(f"every key id must be {ID_BYTES} bytes")
    return [int.from_bytes(k, "big") for k in value]


def parse_found(value: Any, count: int, limits: Limits) -> list[tuple[list[DHTRecord], list[tuple[int, str]]]]:
    """Check a find reply from a peer we asked about ``count`` keys."""
    if not isinstance(value, list) or len(value) != count:
        raise ValueError("find reply has the wrong number of results")
    out = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list):
            raise ValueError("find result must be [records, nearest]")
        records = parse_records(item[0], limits)
        nearest = []
        for peer in item[1][:256]:
            # the common, well-formed case inline (this runs for every contact of every find reply)
            if (
                type(peer) is list and len(peer) == 2 and type(peer[0]) is bytes and len(peer[0]) == ID_BYTES
                and type(peer[1]) is str and peer[1].startswith("tcp://") and len(peer[1]) <= MAX_ADDRESS_BYTES
            ):
                nearest.append((int.from_bytes(peer[0], "big"), peer[1]))
            elif (parsed := parse_peer(peer)) is not None:
                nearest.append(parsed)
        out.append((records, nearest))
    return out
