"""Decentralized averaging: DHT matchmaking, butterfly all-reduce, Moshpit grid groups, load balancing."""

from hivesim.averaging.allreduce import AllReduce, RoundReport
from hivesim.averaging.averager import AllreduceException, AveragerCore, DecentralizedAverager, StepResult
from hivesim.averaging.grid import GroupKeyManager, grid_manager, group_key, member_order
from hivesim.averaging.matchmaking import BadRequest, GroupInfo, Matchmaker
from hivesim.averaging.partition import load_balance, optimal_shares, part_sizes
from hivesim.averaging.timing import AdaptiveDeadline

__all__ = [
    "AdaptiveDeadline", "AllreduceException", "AllReduce", "AveragerCore", "BadRequest", "DecentralizedAverager", "GroupInfo",
    "GroupKeyManager", "Matchmaker", "RoundReport", "StepResult", "grid_manager", "group_key", "load_balance",
    "member_order", "optimal_shares", "part_sizes",
]
