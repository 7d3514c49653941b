"""Decentralized averaging on real peers over loopback: exact averages, weights, client and auxiliary
members, load-balanced parts, compression, Moshpit grids, and members killed at each stage of a round."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
import torch

from hivesim.averaging import AveragerCore, grid_manager, load_balance, optimal_shares
from hivesim.averaging.partition import DEFAULT_MAX_SHARE
from hivesim.dht import DHTNode
from hivesim.dht.storage import get_dht_time
from hivesim.net import RemoteError, ShapedLinks

from dht_swarm import make_swarm, stop_all

ROUND = 20.0  # every step of these tests must end well within this


@pytest.fixture
async def swarm_factory():
    made: list[DHTNode] = []

    async def make(n: int, **kwargs) -> list[DHTNode]:
        nodes = await make_swarm(n, seed=n, **kwargs)
        made.extend(nodes)
        return nodes

    yield make
    await stop_all(made)


def cores_for(nodes, tensors, **kwargs):
    return [AveragerCore(node.endpoint, node, t, **kwargs) for node, t in zip(nodes, tensors)]


async def start(cores):
    for core in cores:
        await core.start()
    return cores


async def step_all(cores, **kwargs):
    return await asyncio.wait_for(asyncio.gather(*(c.step(**kwargs) for c in cores)), ROUND)


@pytest.mark.parametrize("n", [2, 3, 5, 16])
async def test_exact_average_in_one_group(swarm_factory, n):
    nodes = await swarm_factory(n)
    gen = torch.Generator().manual_seed(n)
    tensors = [[torch.randn(7, 3, generator=gen), torch.randn(11, generator=gen)] for _ in range(n)]
    expected = [torch.stack([t[k] for t in tensors]).mean(0) for k in range(2)]
    cores = await start(cores_for(nodes, tensors, prefix="exact", target_group_size=n, matchmaking_time=5.0))
    results = await step_all(cores)
    assert all(r is not None and r.group_size == n and r.averaged_fraction == 1.0 for r in results)
    ids = [list(r) for r in results]
    assert all(i == ids[0] for i in ids)  # the same order on every member
    assert sorted(r.my_index for r in results) == list(range(n))
    for core in cores:
        with core.get_tensors() as got:
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


async def test_weights_and_gather(swarm_factory):
    nodes = await swarm_factory(3)
    values = [1.0, 4.0, 10.0]
    weights = [1.0, 2.0, 3.0]
    cores = await start(cores_for(nodes, [[torch.full((10,), v)] for v in values], prefix="w", target_group_size=3))
    results = await asyncio.wait_for(asyncio.gather(*(c.step(weight=w, gather={"w": w}) for c, w in zip(cores, weights))), ROUND)
    expected = sum(v * w for v, w in zip(values, weights)) / sum(weights)
    for core, result in zip(cores, results):
        assert sorted(g["w"] for g in result.values()) == weights
        torch.testing.assert_close(core.tensors[0], torch.full((10,), expected))


async def test_client_and_auxiliary_members(swarm_factory):
    nodes = await swarm_factory(4)
    values = [1.0, 2.0, 6.0, 100.0]  # the last peer is auxiliary: its values must not count
    cores = cores_for(nodes[:2], [[torch.full((64,), v)] for v in values[:2]], prefix="ca", target_group_size=4)
    cores.append(AveragerCore(nodes[2].endpoint, nodes[2], [torch.full((64,), values[2])], prefix="ca",
                              target_group_size=4, client_mode=True))
    cores.append(AveragerCore(nodes[3].endpoint, nodes[3], [torch.full((64,), values[3])], prefix="ca",
                              target_group_size=4, auxiliary=True))
    results = await step_all(await start(cores))
    order = list(results[0])
    client_index, aux_index = order.index(nodes[2].peer_id), order.index(nodes[3].peer_id)
    sizes = results[0].part_sizes
    assert sizes[client_index] == 0 and sizes[aux_index] > 0 and sum(sizes) == 64
    for core in cores[:3]:
        torch.testing.assert_close(core.tensors[0], torch.full((64,), 3.0))
    torch.testing.assert_close(cores[3].tensors[0], torch.full((64,), 100.0))  # holds nothing averaged


async def test_parts_follow_bandwidth(swarm_factory):
    nodes = await swarm_factory(4)
    bandwidths = [1000.0, 100.0, 100.0, 300.0]
    tensors = [[torch.randn(1000)] for _ in nodes]
    expected = torch.stack([t[0] for t in tensors]).mean(0)
    cores = [AveragerCore(n.endpoint, n, t, prefix="bw", target_group_size=4, bandwidth=b)
             for n, t, b in zip(nodes, tensors, bandwidths)]
    results = await step_all(await start(cores))
    by_id = {n.peer_id: b for n, b in zip(nodes, bandwidths)}
    in_order = [by_id[pid] for pid in results[0]]
    assert results[0].part_sizes == load_balance(1000, in_order, [True] * 4, max_share=DEFAULT_MAX_SHARE)
    assert results[0].part_sizes[in_order.index(1000.0)] == max(results[0].part_sizes)
    assert results[0].part_sizes != [250] * 4
    for core in cores:
        torch.testing.assert_close(core.tensors[0], expected, rtol=0, atol=1e-5)


def test_load_balancing_matches_dedloc_toy_cases():
    # DeDLOC's toy cases (papers.md): all aggregation on one fast peer, 1.5x and 1.75x faster than equal shares
    for bandwidths, speedup in (([1000, 1000, 100, 100], 1.5), ([1000] + [100] * 7, 1.75)):
        w = optimal_shares(bandwidths, [True] * len(bandwidths))
        g = len(bandwidths)
        cost = lambda s: max((1 + (g - 2) * si) / b for si, b in zip(s, bandwidths))  # noqa: E731
        assert cost([1 / g] * g) / cost(w) == pytest.approx(speedup, rel=1e-6)
    assert optimal_shares([5, 5, 5], [True, False, True])[1] == 0.0
    with pytest.raises(ValueError):
        optimal_shares([1, 1], [False, False])


@pytest.mark.parametrize("codec,bound", [("float16", 2e-3), ("uniform8", 0.05)])
async def test_compression_error_is_bounded(swarm_factory, codec, bound):
    nodes = await swarm_factory(4)
    gen = torch.Generator().manual_seed(1)
    tensors = [[torch.randn(4096, generator=gen)] for _ in nodes]
    expected = torch.stack([t[0] for t in tensors]).mean(0)
    cores = await start(cores_for(nodes, tensors, prefix="cz", target_group_size=4, compression=codec))
    results = await step_all(cores)
    assert all(r is not None and r.group_size == 4 for r in results)
    for core in cores:
        error = (core.tensors[0] - expected).abs().max().item()
        assert 0 < error < bound, (codec, error)  # lossy for real, and within the codec's bound


async def moshpit_rounds(nodes, side, dims, rounds, seed):
    rng = random.Random(seed)
    cells = list(range(side ** dims))
    rng.shuffle(cells)
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(1, generator=gen, dtype=torch.float64).float() for _ in nodes]
    truth = torch.stack(values).double().mean()
    cores = await start([
        AveragerCore(n.endpoint, n, [v], prefix="mosh", target_group_size=side,
                     key_manager=grid_manager("mosh", cell, side, dims), matchmaking_time=5.0)
        for n, v, cell in zip(nodes, values, cells)
    ])
    errors = []
    for _ in range(rounds):
        results = await step_all(cores)
        assert all(r is not None and r.group_size == side for r in results)
        errors.append(max(abs(c.tensors[0].double().item() - truth.item()) for c in cores))
    return errors


async def test_moshpit_4x4_is_exact_after_two_rounds(swarm_factory):
    errors = await moshpit_rounds(await swarm_factory(16), side=4, dims=2, rounds=2, seed=5)
    assert errors[0] > 1e-3  # one round is not enough...
    assert errors[1] < 1e-6  # ...two are


async def test_moshpit_2x2x2_is_exact_after_three_rounds(swarm_factory):
    errors = await moshpit_rounds(await swarm_factory(8), side=2, dims=3, rounds=3, seed=7)
    assert errors[1] > 1e-3
    assert errors[2] < 1e-6


async def test_a_leader_hands_its_group_over_to_a_better_ranked_leader(swarm_factory):
    # a scheduled round (one deadline for all, no early start): C and D cannot see A and B for a while, so C
    # starts leading D while A leads B. Once A is visible, C brings D over and the key's four peers
    # average as one group (before, two groups of two met at the deadline)
    nodes = await swarm_factory(4)
    nodes.sort(key=lambda n: n.peer_id)  # equal deadlines: ranked by peer id, A best
    cores = await start(cores_for(nodes, [[torch.full((8,), v)] for v in (1.0, 2.0, 3.0, 10.0)], prefix="merge",
                                  target_group_size=4, early_start=False))
    a, b, c, d = cores
    for core in (c, d):
        core.bans._until[a.peer_id] = core.bans._until[b.peer_id] = time.monotonic() + 1.8
    deadline = get_dht_time() + 5.0
    results = await asyncio.wait_for(asyncio.gather(*(core.step(deadline=deadline) for core in cores)), ROUND)
    assert all(r is not None and r.group_size == 4 for r in results)
    assert c.matchmaker.stats["join_requests"] >= 1
    for core in cores:
        torch.testing.assert_close(core.tensors[0], torch.full((8,), 4.0))


async def test_finished_rounds_hold_no_vectors(swarm_factory):
    # the averager remembers its last rounds (to refuse late contributions clearly); each used to keep its
    # whole flat vector alive: with a big model, 16 copies of it per peer, growing round after round
    nodes = await swarm_factory(3)
    cores = await start(cores_for(nodes, [[torch.full((50_000,), float(i))] for i in range(3)], prefix="mem",
                                  target_group_size=3))
    for _ in range(3):
        assert all(r is not None for r in await step_all(cores))
    for core in cores:
        assert len(core.allreduce.rounds) == 3
        for state in core.allreduce.rounds.values():
            assert state.local is None and state.accumulated is None and state.result is None
        torch.testing.assert_close(core.tensors[0], torch.full((50_000,), 1.0))


async def test_a_lone_peer_joins_a_short_group_under_a_sibling_key(swarm_factory):
    # two peers under .0b01 wait for a group of 4 until their deadline (no early start); a third, alone under
    # .0b00, looks under the sibling keys and joins them before that deadline
    nodes = await swarm_factory(3)
    kwargs = dict(prefix="lone", target_group_size=4, matchmaking_time=4.0)
    waiting = [AveragerCore(n.endpoint, n, [torch.full((8,), v)], initial_group_bits="01", early_start=False, **kwargs)
               for n, v in zip(nodes[:2], (1.0, 2.0))]
    lone = AveragerCore(nodes[2].endpoint, nodes[2], [torch.full((8,), 6.0)], initial_group_bits="00", **kwargs)
    results = await step_all(await start([*waiting, lone]))
    assert all(r is not None and r.group_size == 3 for r in results)
    assert lone.matchmaker.stats["merges"] == 1  # it moved once, to the short group's key
    for core in (*waiting, lone):
        torch.testing.assert_close(core.tensors[0], torch.full((8,), 3.0))


async def test_a_leader_does_not_wait_for_peers_taken_by_another_group(swarm_factory):
    # Y leads Z under the key; X and W come later and cannot see Y (banned), so they form their own group.
    # Z is declared under the key, ranked below X, but it follows Y: X must start once its group settles,
    # not wait out its 4 s window for Z
    y_node, z_node, x_node, w_node = await swarm_factory(4)
    kwargs = dict(prefix="taken", target_group_size=4)
    y = AveragerCore(y_node.endpoint, y_node, [torch.full((8,), 1.0)], matchmaking_time=5.0, early_start=False, **kwargs)
    z = AveragerCore(z_node.endpoint, z_node, [torch.full((8,), 3.0)], matchmaking_time=6.0, **kwargs)
    x = AveragerCore(x_node.endpoint, x_node, [torch.full((8,), 10.0)], matchmaking_time=4.0, **kwargs)
    w = AveragerCore(w_node.endpoint, w_node, [torch.full((8,), 20.0)], matchmaking_time=5.0, **kwargs)
    await start([y, z, x, w])
    first = [asyncio.create_task(y.step()), asyncio.create_task(asyncio.sleep(0.1))]
    await first[1]
    first.append(asyncio.create_task(z.step()))
    await asyncio.sleep(1.0)
    assert z.matchmaker.search is not None and z.matchmaker.search.following
    x.bans.ban(y.peer_id)
    w.bans.ban(y.peer_id)
    late = await step_all([x, w])
    assert all(r is not None and r.group_size == 2 for r in late)
    assert late[0].matchmaking_s < 3.0  # started on its own, well before its 4 s window ended
    torch.testing.assert_close(x.tensors[0], torch.full((8,), 15.0))
    early = await asyncio.wait_for(asyncio.gather(first[0], first[2]), ROUND)
    assert all(r is not None and r.group_size == 2 for r in early)
    torch.testing.assert_close(z.tensors[0], torch.full((8,), 2.0))


@pytest.mark.parametrize("attempt", range(3))
async def test_two_lone_peers_under_sibling_keys_meet(swarm_factory, attempt):
    # each is alone under its key: the worse-ranked one moves to the better-ranked one (had both moved
    # to the other's key at the same time, they would have swapped and missed each other again)
    nodes = await swarm_factory(2)
    cores = [AveragerCore(n.endpoint, n, [torch.full((8,), v)], prefix="pair", target_group_size=4, matchmaking_time=4.0,
                          initial_group_bits=bits) for n, v, bits in zip(nodes, (1.0, 5.0), ("10", "11"))]
    results = await asyncio.gather(*(c.step() for c in await start(cores)))
    assert all(r is not None and r.group_size == 2 for r in results)
    assert sorted(c.matchmaker.stats["merges"] for c in cores) == [0, 1]  # one moved, the other stayed
    for core in cores:
        torch.testing.assert_close(core.tensors[0], torch.full((8,), 3.0))


async def test_a_peer_with_nobody_anywhere_gives_up_early(swarm_factory):
    (node,) = await swarm_factory(1)
    core = await AveragerCore(node.endpoint, node, [torch.ones(4)], prefix="alone", target_group_size=4,
                              initial_group_bits="10", matchmaking_time=8.0).start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await asyncio.wait_for(core.step(), ROUND) is None
    # it looked under every key twice, a lone wait (2-3 s here) apart, and stopped before its 8 s window
    assert loop.time() - t0 < 7.5


# ---------------------------------------------------------------------------------------------- faults

class Killed(Exception):
    pass


async def faulty_group(swarm_factory, victim_hook, numel=4096, victim_links=None):
    """Four members, member 0 of the swarm is the victim; returns (cores, results, values)."""
    nodes = await swarm_factory(3)
    victim = await DHTNode.create([nodes[0].address], links=victim_links)
    values = [float(v) for v in (1, 2, 3, 50)]  # the victim holds 50
    everyone = [*nodes, victim]
    tensors = [[torch.full((numel,), v)] for v in values]
    kwargs = dict(prefix="ft", target_group_size=4, allreduce_timeout=4.0, matchmaking_time=5.0)
    cores = [AveragerCore(n.endpoint, n, t, **kwargs) for n, t in zip(nodes, tensors)]
    cores.append(AveragerCore(victim.endpoint, victim, tensors[3], fault_hook=lambda event, state: victim_hook(event, state, victim), **kwargs))
    await start(cores)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.wait_for(asyncio.gather(*(c.step() for c in cores), return_exceptions=True), ROUND)
    elapsed = loop.time() - t0
    await victim.shutdown()
    return cores, results, elapsed, everyone


def check_survivors(cores, results, elapsed, *, victim_counted: bool | None):
    """Healthy members agree on every part: parts reduced by healthy members hold the healthy mean (2.0),
    or the mean with the victim (14.0) if its contribution got through; the victim's part keeps local values."""
    assert elapsed < 12.0
    healthy = [r for r in results[:3]]
    assert all(r is not None and not isinstance(r, BaseException) for r in healthy), healthy
    order = list(healthy[0])
    sizes = healthy[0].part_sizes
    victim_index = order.index(cores[3].peer_id)
    offsets = np.cumsum([0] + sizes)
    for core, result in zip(cores[:3], healthy):
        assert victim_index in result.failed_members
        assert result.averaged_fraction == pytest.approx(1 - sizes[victim_index] / sum(sizes))
        value = core.tensors[0]
        own = value[offsets[victim_index]:offsets[victim_index + 1]]
        local = {1.0, 2.0, 3.0}
        assert own.numel() > 0 and own.unique().numel() == 1 and own[0].item() in local  # kept the local value
    for j in range(4):
        if j == victim_index:
            continue
        got = {round(core.tensors[0][offsets[j]].item(), 4) for core in cores[:3]}
        assert len(got) == 1, got  # all healthy members got the same average for this part
        allowed = {2.0} if victim_counted is False else {2.0, 14.0}
        assert got <= allowed, (j, got)


async def test_member_killed_before_sending(swarm_factory):
    async def hook(event, state, victim):
        if event == "group":
            await victim.shutdown()
            raise Killed()

    cores, results, elapsed, _ = await faulty_group(swarm_factory, hook)
    assert isinstance(results[3], Killed)
    check_survivors(cores, results, elapsed, victim_counted=False)


async def slow_victim_dies(swarm_factory, event: str, delay: float):
    """:func:`faulty_group` with 8 MiB parts and a victim on a 16 MB/s uplink (each of its streams of three
    parts takes ~1.5 s) that shuts down ``delay`` seconds after the fault hook's ``event``."""
    async def hook(name, state, victim):
        if name == event:
            asyncio.get_running_loop().call_later(delay, lambda: asyncio.ensure_future(victim.shutdown()))

    links = ShapedLinks("victim", 0.0, uplink=16e6)
    return await faulty_group(swarm_factory, hook, numel=8 << 20, victim_links=links)


async def test_member_killed_while_sending(swarm_factory):
    # the victim's 3 parts of 8 MiB, streamed in chunks, take ~1.5 s; it dies 0.3 s in
    cores, results, elapsed, _ = await slow_victim_dies(swarm_factory, "group", 0.3)
    check_survivors(cores, results, elapsed, victim_counted=False)


async def test_member_killed_while_reducing(swarm_factory):
    async def hook(event, state, victim):
        if event == "reduced":  # it holds everyone's contribution to its part and dies before answering
            await victim.shutdown()

    cores, results, elapsed, _ = await faulty_group(swarm_factory, hook)
    check_survivors(cores, results, elapsed, victim_counted=None)


async def test_failed_member_is_not_waited_on_next_round(swarm_factory):
    async def hook(event, state, victim):
        if event == "group":
            await victim.shutdown()
            raise Killed()

    cores, results, _, everyone = await faulty_group(swarm_factory, hook)
    assert all(cores[3].peer_id in c.bans for c in cores[:3])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    again = await asyncio.wait_for(asyncio.gather(*(c.step() for c in cores[:3])), ROUND)
    assert all(r is not None and r.group_size == 3 and not r.failed_members for r in again)
    assert loop.time() - t0 < 3.0  # formed without waiting for the dead peer


async def test_malformed_requests_get_errors_and_the_peer_keeps_serving(swarm_factory):
    nodes = await swarm_factory(3)
    cores = await start(cores_for(nodes, [[torch.ones(8) * i] for i in range(3)], prefix="bad", target_group_size=3))
    target = nodes[1].address
    caller = nodes[0].endpoint
    bad_parts = [None, 5, {"gid": 3}, {"gid": b"x" * 100}, {"gid": b"g", "from": "me", "w": 1},
                 {"gid": b"g", "from": 0, "w": float("nan")}, {"gid": b"g", "from": 0, "w": -1}]
    for payload in bad_parts:
        with pytest.raises(RemoteError, match="BadRequest"):
            await caller.call(target, "avg.bad.part", payload, timeout=5)
    with pytest.raises(RemoteError, match="unknown group"):
        await caller.call(target, "avg.bad.part", {"gid": b"nope", "from": 0, "w": 1.0, "part": {}}, timeout=5)
    peer = {"id": b"someone", "addr": "tcp://127.0.0.1:1", "bw": 1.0}
    for payload in [None, {"key": 1}, {"key": "avg", "rank": [1, 2]}, {"key": "k", "rank": [1.0, b"x"], "peer": {"id": 5}},
                    {"key": "k", "rank": [1.0, b"x"], "peer": peer, "with": "everyone"},  # a group handed over, malformed
                    {"key": "k", "rank": [1.0, b"x"], "peer": peer, "with": [{"id": b"y", "bw": -1}]}]:
        with pytest.raises(RemoteError, match="BadRequest"):
            await caller.call(target, "avg.bad.join", payload, timeout=5)
    with pytest.raises(RemoteError):
        await caller.call(target, "avg.bad.await", {"token": 7}, timeout=5)
    results = await step_all(cores)  # still serving
    assert all(r is not None and r.group_size == 3 for r in results)
    for core in cores:
        torch.testing.assert_close(core.tensors[0], torch.ones(8))


async def test_lonely_peer_gives_up_within_its_deadline(swarm_factory):
    nodes = await swarm_factory(2)
    core = await AveragerCore(nodes[0].endpoint, nodes[0], [torch.ones(3)], prefix="alone", target_group_size=2,
                              matchmaking_time=0.6).start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await core.step() is None
    assert loop.time() - t0 < 2.0
    torch.testing.assert_close(core.tensors[0], torch.ones(3))


async def test_wrong_arguments_are_refused(swarm_factory):
    (node,) = await swarm_factory(1)
    with pytest.raises(ValueError):
        AveragerCore(node.endpoint, node, [], prefix="x", target_group_size=2)
    with pytest.raises(ValueError):
        AveragerCore(node.endpoint, node, [torch.ones(2)], prefix="x", target_group_size=2, client_mode=True, auxiliary=True)
    with pytest.raises(TypeError):
        AveragerCore(node.endpoint, node, [torch.ones(2, dtype=torch.int64)], prefix="x", target_group_size=2)
    with pytest.raises(ValueError):
        AveragerCore(node.endpoint, node, [torch.ones(2)], prefix="x", target_group_size=2, initial_group_bits="012")
    with pytest.raises(ValueError):
        AveragerCore(node.endpoint, node, [torch.ones(2)], prefix="x", target_group_size=1, min_group_size=2)
