"""Decentralized averaging: DHT matchmaking, butterfly all-reduce, Moshpit grid groups, load balancing,
Byzantine-robust aggregation, state for newcomers."""

from hivesim.averaging.allreduce import AllReduce, RoundReport
from hivesim.averaging.averager import AllreduceException, AveragerCore, DecentralizedAverager, StepResult
from hivesim.averaging.grid import GroupKeyManager, grid_manager, group_key, member_order
from hivesim.averaging.matchmaking import BadRequest, GroupInfo, Matchmaker
from hivesim.averaging.partition import load_balance, optimal_shares, part_sizes
from hivesim.averaging.robust import AGGREGATIONS, Aggregation, aggregate
from hivesim.averaging.timing import AdaptiveDeadline

__all__ = [
    "AGGREGATIONS", "AdaptiveDeadline", "Aggregation", "AllreduceException", "AllReduce", "AveragerCore", "BadRequest", "DecentralizedAverager", "GroupInfo",
    "GroupKeyManager", "Matchmaker", "RoundReport", "StepResult", "grid_manager", "group_key", "load_balance",
    "aggregate", "member_order", "optimal_shares", "part_sizes",
]
