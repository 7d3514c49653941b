"""Collaborative training: a hivemind-compatible ``Optimizer``, swarm progress, state for newcomers."""

from hivesim.optim.optimizer import EpochReport, Optimizer
from hivesim.optim.progress import GlobalProgress, LocalProgress, ProgressRecord, ProgressTracker
from hivesim.optim.state_sharing import DownloadedState, StateServer, StateUnavailable, download_state, find_donors
from hivesim.optim.training_state import StateMismatch

__all__ = [
    "DownloadedState", "EpochReport", "GlobalProgress", "LocalProgress", "Optimizer", "ProgressRecord",
    "ProgressTracker", "StateMismatch", "StateServer", "StateUnavailable", "download_state", "find_donors",
]
