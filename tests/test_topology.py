"""Topology files: validation with file:line errors, and the seeded schedule."""

import textwrap

import pytest

from hivesim.sim.network import link_params
from hivesim.sim.schedule import build_schedule
from hivesim.sim.topology import TopologyError, load_topology, parse_rate

GOOD = """\
name: t
seed: 3
duration: 60
groups:
  a: {count: 6, region: eu}
  b: {count: 4, region: us, uplink: 80Mbit/s}
network:
  latency:
    regions: {eu: {eu: 0.01, us: 0.05}, us: {us: 0.002}}
churn:
  lifetime: {distribution: weibull, shape: 1.5, scale: 30}
  rejoin_after: 3
  kills: [{at: 20, fraction: 0.5, group: a}]
faults:
  partitions: [{at: 30, duration: 5, groups: [b]}]
workload: {module: experiments.dht_lookup}
"""


def write(tmp_path, text, name="t.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_good_topology_loads_and_overrides_apply(tmp_path):
    topology, resolved = load_topology(write(tmp_path, GOOD), ["duration=10", "groups.a.count=3"])
    assert topology.duration == 10 and topology.groups["a"].count == 3
    assert topology.groups["b"].uplink == 80e6 / 8
    assert resolved["groups"]["a"]["count"] == 3


@pytest.mark.parametrize(
    "mistake, expected",
    [
        (("count: 6, region: eu", "count: six, region: eu"), ":5: groups.a.count: Input should be a valid integer"),
        (("duration: 60", "duraton: 60"), "did you mean 'duration'?"),
        (("uplink: 80Mbit/s", "uplnk: 80Mbit/s"), ":6: groups.b.uplnk: unknown key 'uplnk' (did you mean 'uplink'?)"),
        (("uplink: 80Mbit/s", "uplink: fast"), "not a bandwidth: 'fast'"),
        (("groups: [b]", "groups: [c]"), "no group named 'c'"),
        (("region: us,", "region: mars,"), "must be one of the latency regions"),
        (("shape: 1.5, ", ""), "weibull lifetime needs 'shape' and 'scale'"),
        (("workload: {module: experiments.dht_lookup}", ""), "workload: required key is missing"),
        (("fraction: 0.5, group: a", "group: a"), "a kill names either 'peers' or a 'fraction'"),
        (("  a: {count: 6, region: eu}", "  a: {count: 6, region: eu"), "not valid YAML"),
    ],
)
def test_mistakes_name_the_key_and_the_line(tmp_path, mistake, expected):
    old, new = mistake
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert expected in str(info.value), str(info.value)
    assert "Traceback" not in str(info.value)


def test_bad_overrides_are_reported_as_such(tmp_path):
    with pytest.raises(TopologyError, match="command-line override duration"):
        load_topology(write(tmp_path, GOOD), ["duration=-5"])
    with pytest.raises(TopologyError, match="not key=value"):
        load_topology(write(tmp_path, GOOD), ["duration"])
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "missing.yaml")


def test_same_seed_same_schedule_and_links(tmp_path):
    path = write(tmp_path, GOOD)
    first, _ = load_topology(path)
    again, _ = load_topology(path)
    other, _ = load_topology(path, ["seed=4"])
    events = [e.to_dict() for e in build_schedule(first)]
    assert events == [e.to_dict() for e in build_schedule(again)]
    assert events != [e.to_dict() for e in build_schedule(other)]
    kinds = {e["action"] for e in events}
    assert {"kill", "join", "partition", "heal"} <= kinds
    scheduled = [e for e in events if e["cause"] == "scheduled"]
    assert len(scheduled) >= 1 and all(e["peer"].startswith("a.") for e in scheduled)
    # no event kills a dead peer or revives a live one
    alive = set(first.peer_names())
    for e in events:
        if e["action"] == "kill":
            assert e["peer"] in alive
            alive.discard(e["peer"])
        elif e["action"] == "join":
            assert e["peer"] not in alive
            alive.add(e["peer"])
    latency, params, _ = link_params(first, first.seed)
    assert latency("a.0", "b.1") == latency("b.1", "a.0") == 0.05
    assert latency("b.0", "b.1") == 0.002
    assert params["b.0"]["uplink"] == 10e6 and params["a.0"]["uplink"] is None


def test_graph_latencies_are_shortest_paths(tmp_path):
    text = GOOD.replace("    regions: {eu: {eu: 0.01, us: 0.05}, us: {us: 0.002}}",
                        "    graph: {generator: barabasi_albert_graph, params: {n: 20, m: 2}, scale: 0.01}")
    topology, _ = load_topology(write(tmp_path, text))
    latency, _, _ = link_params(topology, 0)
    names = topology.peer_names()
    values = {latency(a, b) for a in names for b in names if a != b}
    assert all(v >= 0 for v in values) and max(values) <= 0.01 * 20
    assert all(abs(latency(a, b) - latency(b, a)) < 1e-12 for a in names for b in names)


def test_rates_parse_units():
    assert parse_rate("100Mbit/s") == 12.5e6
    assert parse_rate("10MB/s") == 10e6
    assert parse_rate("1GiB/s") == 2**30
    assert parse_rate(5e6) == 5e6 and parse_rate(None) is None
    with pytest.raises(ValueError):
        parse_rate("-3MB/s")


def test_a_scheduled_kill_without_rejoin_is_for_good(tmp_path):
    """Issue 16: a peer killed by a scheduled kill (no rejoin_after) came back through its lifetime
    schedule's own rejoin. Every later lifetime event of that peer is cancelled; the others keep theirs."""
    text = GOOD.replace("{distribution: weibull, shape: 1.5, scale: 30}", "{distribution: exponential, mean: 4}")
    text = text.replace("rejoin_after: 3", "rejoin_after: 0.5")
    text = text.replace("kills: [{at: 20, fraction: 0.5, group: a}]",
                        "kills: [{at: 20, peers: [a.0, a.1, a.2, a.3, a.4, a.5]}, {at: 25, fraction: 0.5, group: b}]")
    topology, _ = load_topology(write(tmp_path, text))
    events = build_schedule(topology)
    for peer in [f"a.{i}" for i in range(6)]:
        assert not [e for e in events if e.peer == peer and e.t > 20], peer  # gone for good
    victims = {e.peer for e in events if e.cause == "scheduled" and e.t == 25}
    assert victims
    for peer in victims:
        assert not [e for e in events if e.peer == peer and e.t > 25], peer
    # peers nobody killed for good still churn after the kills (mean lifetime 4 s, 60 s run)
    survivors = {f"b.{i}" for i in range(4)} - victims
    assert any(e.peer in survivors and e.t > 25 for e in events)


def test_network_encryption_can_be_switched_off_per_topology():
    from pathlib import Path

    quickstart = Path(__file__).resolve().parents[1] / "topologies" / "quickstart.yaml"
    on, _ = load_topology(quickstart)
    off, _ = load_topology(quickstart, ["network.encryption=false"])
    assert on.network.encryption is True and off.network.encryption is False
