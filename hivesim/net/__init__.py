"""The wire: serialization, async RPC over ZeroMQ, the link model, codecs and peer identity."""

from hivesim.net.errors import BadMessage, PeerUnreachable, RemoteError, RPCError, RPCTimeout
from hivesim.net.identity import Identity, canonical_bytes, peer_id_from_public_key, verify, verify_record
from hivesim.net.links import IdentityLinks, LinkModel, ShapedLinks, TokenBucket
from hivesim.net.rpc import CallContext, Endpoint
from hivesim.net.serialization import pack, unpack

_CODEC_NAMES = ("CODECS", "Codec", "SizeAdaptiveCompression", "get_codec")


def __getattr__(name: str) -> object:
    """The codecs are torch code: imported on first use, so that DHT-only processes never load torch."""
    if name in _CODEC_NAMES:
        from hivesim.net import codecs

        return getattr(codecs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BadMessage", "CODECS", "CallContext", "Codec", "Endpoint", "Identity", "IdentityLinks", "LinkModel",
    "PeerUnreachable", "RPCError", "RPCTimeout", "RemoteError", "ShapedLinks", "SizeAdaptiveCompression",
    "TokenBucket", "canonical_bytes", "get_codec", "pack", "peer_id_from_public_key", "unpack", "verify",
    "verify_record",
]
