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

# Public names whose modules import torch, loaded on first use (name -> module), so that a DHT-only
# process (hundreds of packed DHT peers) never loads torch's ~300 MiB. Torch-using packages (averaging,
# moe, optim) belong here rather than in an import block above.
_LAZY = {"SizeAdaptiveCompression": "hivesim.net.codecs"}
_LAZY.update(dict.fromkeys(["ExpertServer", "RemoteExpert", "RemoteMixtureOfExperts", "RemoteSwitchMixtureOfExperts",
                            "MoEBeamSearcher", "get_experts"], "hivesim.moe"))
_LAZY["DecentralizedAverager"] = "hivesim.averaging"
_LAZY["AllreduceException"] = "hivesim.averaging"
_LAZY["Aggregation"] = "hivesim.averaging"
_LAZY.update(dict.fromkeys(["Optimizer", "DiLoCoOptimizer", "ProgressTracker", "GlobalProgress"], "hivesim.optim"))


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "DHT", "DHTNode", "SchemaValidator", "SignatureValidator", "ValueWithExpiration", "get_dht_time", "owner_marker",
    "BadMessage", "CallContext", "Endpoint", "Identity", "IdentityLinks", "PeerUnreachable", "RPCError",
    "RPCTimeout", "RemoteError", "ShapedLinks", "SizeAdaptiveCompression", "__version__",
    "ExpertServer", "RemoteExpert", "RemoteMixtureOfExperts", "RemoteSwitchMixtureOfExperts", "MoEBeamSearcher",
    "get_experts",
    "DecentralizedAverager", "AllreduceException", "Aggregation", "Optimizer", "DiLoCoOptimizer", "ProgressTracker", "GlobalProgress",
]
