"""The wire: serialization, async RPC over ZeroMQ, the link model, codecs and peer identity."""

from hivesim.net.codecs import CODECS, Codec, SizeAdaptiveCompression, get_codec
from hivesim.net.errors import BadMessage, PeerUnreachable, RemoteError, RPCError, RPCTimeout
from hivesim.net.identity import Identity, canonical_bytes, peer_id_from_public_key, verify, verify_record
from hivesim.net.links import IdentityLinks, LinkModel, ShapedLinks, TokenBucket
from hivesim.net.rpc import CallContext, Endpoint
from hivesim.net.serialization import pack, unpack

__all__ = [
    "BadMessage", "CODECS", "CallContext", "Codec", "Endpoint", "Identity", "IdentityLinks", "LinkModel",
    "PeerUnreachable", "RPCError", "RPCTimeout", "RemoteError", "ShapedLinks", "SizeAdaptiveCompression",
    "TokenBucket", "canonical_bytes", "get_codec", "pack", "peer_id_from_public_key", "unpack", "verify",
    "verify_record",
]
