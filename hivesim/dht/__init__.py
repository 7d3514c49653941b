"""Kademlia DHT: an async node, a blocking facade, signed and schema-checked records."""

from hivesim.dht.facade import DHT
from hivesim.dht.node import DHTNode
from hivesim.dht.protocol import Limits
from hivesim.dht.routing import RoutingTable, key_id
from hivesim.dht.storage import DHTRecord, LocalStorage, ValueWithExpiration, get_dht_time
from hivesim.dht.validation import (
    CompositeValidator,
    RecordRejected,
    RecordValidator,
    SchemaValidator,
    SignatureValidator,
    owner_marker,
)

__all__ = [
    "CompositeValidator", "DHT", "DHTNode", "DHTRecord", "Limits", "LocalStorage", "RecordRejected",
    "RecordValidator", "RoutingTable", "SchemaValidator", "SignatureValidator", "ValueWithExpiration",
    "get_dht_time", "key_id", "owner_marker",
]
