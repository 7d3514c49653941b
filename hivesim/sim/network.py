"""From a topology's ``network`` section to every peer's :class:`~hivesim.net.ShapedLinks`.

Each peer gets a *position* (its region, or a node of a generated graph) and all positions share one
latency matrix, so every peer computes the same A->B latency (symmetric unless the matrix says
otherwise). The matrix is small (regions x regions, or graph nodes x graph nodes) and is shipped to
the actors as a plain list.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from scipy.sparse.csgraph import shortest_path

from hivesim.sim.latency import LatencyModel
from hivesim.sim.topology import LatencySpec, Topology, TopologyError


def build_latency(topology: Topology, seed: int) -> LatencyModel:
    peers = topology.peer_names()
    spec = topology.network.latency
    if not isinstance(spec, LatencySpec):
        return LatencyModel({p: 0 for p in peers}, [[float(spec)]])
    if spec.constant is not None:
        return LatencyModel({p: 0 for p in peers}, [[spec.constant]])
    if spec.regions is not None:
        return _regions(topology, spec.regions)
    if spec.graph is not None:
        return _graph(topology, seed)
    return LatencyModel({p: 0 for p in peers}, [[0.0]])


def _regions(topology: Topology, table: dict[str, dict[str, float]]) -> LatencyModel:
    names = sorted(set(table) | {r for row in table.values() for r in row})
    index = {r: i for i, r in enumerate(names)}
    matrix = [[0.0] * len(names) for _ in names]
    for a in names:
        for b in names:
            value = table.get(a, {}).get(b, table.get(b, {}).get(a))
            if value is None:
                if a == b:
                    value = 0.0
                else:
                    raise TopologyError(f"network.latency.regions: no latency between {a!r} and {b!r}")
            if value < 0:
                raise TopologyError(f"network.latency.regions.{a}.{b}: latency must be >= 0 seconds")
            matrix[index[a]][index[b]] = float(value)
    positions = {}
    for group, gspec in topology.groups.items():
        for i in range(gspec.count):
            positions[f"{group}.{i}"] = index[gspec.region]  # validated: every group names a region
    return LatencyModel(positions, matrix)


def _graph(topology: Topology, seed: int) -> LatencyModel:
    spec = topology.network.latency.graph  # type: ignore[union-attr]
    generator = getattr(nx, spec.generator, None)
    if generator is None or not callable(generator):
        raise TopologyError(f"network.latency.graph.generator: networkx has no generator {spec.generator!r}")
    params = dict(spec.params)
    params.setdefault("seed", seed)
    try:
        graph = generator(**params)
    except TypeError:
        params.pop("seed")
        try:
            graph = generator(**params)
        except Exception as e:
            raise TopologyError(f"network.latency.graph: {spec.generator}({params}) failed: {e}") from None
    except Exception as e:
        raise TopologyError(f"network.latency.graph: {spec.generator}({params}) failed: {e}") from None
    if graph.number_of_nodes() == 0:
        raise TopologyError("network.latency.graph: the generated graph has no nodes")
    graph = graph.subgraph(max(nx.connected_components(graph.to_undirected()), key=len)).copy()
    nodes = sorted(graph.nodes)
    weight = spec.weight
    if weight is None and all("pos" in graph.nodes[n] for n in nodes):
        for u, v in graph.edges:  # geometric graphs: edge length is the distance between the endpoints
            graph.edges[u, v]["_length"] = float(np.linalg.norm(np.subtract(graph.nodes[u]["pos"], graph.nodes[v]["pos"])))
        weight = "_length"
    adjacency = nx.to_scipy_sparse_array(graph, nodelist=nodes, weight=weight or None)
    distances = shortest_path(adjacency, directed=False, unweighted=weight is None)
    matrix = (distances * spec.scale).tolist()
    rng = random.Random(f"{seed}:positions")
    positions = {p: rng.randrange(len(nodes)) for p in topology.peer_names()}
    return LatencyModel(positions, matrix)


def link_params(topology: Topology, seed: int) -> tuple[LatencyModel, dict[str, dict[str, Any]], dict[str, float]]:
    """The latency model, each peer's ``ShapedLinks`` keyword arguments, and the stragglers' slowdowns."""
    latency = build_latency(topology, seed)
    net = topology.network
    rng = random.Random(f"{seed}:stragglers")
    stragglers: dict[str, float] = {}
    for spec in topology.faults.stragglers:
        pool = [p for p in topology.peer_names() if spec.group is None or p.startswith(f"{spec.group}.")]
        for name in rng.sample(pool, max(1, round(spec.fraction * len(pool))) if pool else 0):
            stragglers[name] = spec.slowdown
    latency.factors = dict(stragglers)
    params: dict[str, dict[str, Any]] = {}
    for group, gspec in topology.groups.items():
        for i in range(gspec.count):
            name = f"{group}.{i}"
            slow = stragglers.get(name, 1.0)
            up = gspec.uplink or net.uplink
            down = gspec.downlink or net.downlink
            params[name] = {
                "jitter": net.jitter,
                "loss": net.loss,
                "uplink": up / slow if up else None,
                "downlink": down / slow if down else None,
                "seed": seed,
            }
    return latency, params, stragglers


def emulated_bandwidth(params: dict[str, dict[str, Any]]) -> float | None:
    """Total bytes/s all shaped uplinks could push at once (None if any uplink is unlimited)."""
    total = 0.0
    for p in params.values():
        if not p.get("uplink"):
            return None
        total += p["uplink"]
    return total
