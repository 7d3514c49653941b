"""Decentralized mixture-of-experts: expert servers, remote experts, DHT beam search, MoE layers."""

from hivesim.moe.beam_search import BlockingMoEBeamSearcher, FoundExpert, MoEBeamSearcher, find_experts, get_experts
from hivesim.moe.experts import EXPERT_CLASSES, make_expert, register_expert_class
from hivesim.moe.mixture import NoExpertsAvailable, RemoteMixtureOfExperts, RemoteSwitchMixtureOfExperts
from hivesim.moe.remote import ExpertError, ExpertFailed, ExpertTimeout, ExpertUnreachable, RemoteExpert
from hivesim.moe.runtime import ExpertBackend, Runtime
from hivesim.moe.server import BadExpertRequest, ExpertServer, UnknownExpert
from hivesim.moe.uids import expand_pattern, grid_uids, make_uid, parse_uid, share_of_grid

__all__ = [
    "EXPERT_CLASSES", "BadExpertRequest", "BlockingMoEBeamSearcher", "find_experts", "get_experts", "ExpertBackend", "ExpertError", "ExpertFailed", "ExpertServer",
    "ExpertTimeout", "ExpertUnreachable", "FoundExpert", "MoEBeamSearcher", "NoExpertsAvailable", "RemoteExpert",
    "RemoteMixtureOfExperts", "RemoteSwitchMixtureOfExperts", "Runtime", "UnknownExpert", "expand_pattern",
    "grid_uids", "make_expert", "make_uid", "parse_uid", "register_expert_class", "share_of_grid",
]
