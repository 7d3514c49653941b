"""Collaborative training: a hivemind-compatible ``Optimizer``, DiLoCo, swarm progress, state for newcomers."""

from hivesim.optim.diloco import DiLoCoOptimizer, fragment_indices
from hivesim.optim.member import EpochReport, SwarmMember
from hivesim.optim.optimizer import Optimizer
from hivesim.optim.progress import GlobalProgress, LocalProgress, ProgressRecord, ProgressTracker
from hivesim.averaging.state_sharing import DownloadedState, StateServer, StateUnavailable, download_state, find_donors
from hivesim.optim.training_state import StateMismatch

__all__ = [
    "DiLoCoOptimizer", "fragment_indices", "DownloadedState", "EpochReport", "GlobalProgress", "LocalProgress", "Optimizer", "ProgressRecord",
    "ProgressTracker", "StateMismatch", "SwarmMember", "StateServer", "StateUnavailable", "download_state", "find_donors",
]
