"""hivesim: decentralized deep learning over unreliable peers, simulated on Ray or deployed for real."""

__version__ = "0.1.0"

from hivesim.net import (  # noqa: E402
    BadMessage,
    CallContext,
    Endpoint,
    Identity,
    IdentityLinks,
    PeerUnreachable,
    RemoteError,
    RPCError,
    RPCTimeout,
    ShapedLinks,
    SizeAdaptiveCompression,
)

from hivesim.dht import (  # noqa: E402
    DHT,
    DHTNode,
    SchemaValidator,
    SignatureValidator,
    ValueWithExpiration,
    get_dht_time,
    owner_marker,
)

__all__ = [
    "DHT", "DHTNode", "SchemaValidator", "SignatureValidator", "ValueWithExpiration", "get_dht_time", "owner_marker",
    "BadMessage", "CallContext", "Endpoint", "Identity", "IdentityLinks", "PeerUnreachable", "RPCError",
    "RPCTimeout", "RemoteError", "ShapedLinks", "SizeAdaptiveCompression", "__version__",
]
