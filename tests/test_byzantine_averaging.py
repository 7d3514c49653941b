"""Hostile members of an averaging group, on real peers over loopback: each test performs the attack and
checks what the honest members end with. Plus the robust rules on their own."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hivesim.averaging import AveragerCore
from hivesim.averaging.allreduce import encode
from hivesim.averaging.robust import Aggregation, aggregate
from hivesim.dht import DHTNode
from hivesim.net import RemoteError
from hivesim.net.codecs import NONE

from test_averaging import ROUND, swarm_factory  # noqa: F401  (the fixture: real DHT nodes, stopped at teardown)


async def group_round(nodes, tensors, *, aggregation=None, weights=None, hooks=None, prefix="byz"):
    """One round of ``len(nodes)`` members; returns (cores, results)."""
    n = len(nodes)
    cores = []
    for i, (node, t) in enumerate(zip(nodes, tensors)):
        hook = (hooks or {}).get(i)
        cores.append(AveragerCore(node.endpoint, node, t, prefix=prefix, target_group_size=n, matchmaking_time=5.0,
                                  allreduce_timeout=5.0, fault_hook=hook))
    for core in cores:
        core.allreduce.aggregation = Aggregation.of(aggregation)
        await core.start()
    weights = weights or [1.0] * n
    results = await asyncio.wait_for(asyncio.gather(*(c.step(weight=w) for c, w in zip(cores, weights))), ROUND)
    return cores, results


# ------------------------------------------------------------------------------------------- the rules

def test_robust_rules_bound_what_attackers_do():
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(9, 1000, generator=gen) * 0.1 + 1.0  # honest members agree around 1.0
    attack = -1000.0 * honest[:7].mean(0, keepdim=True).repeat(7, 1)  # 7 of 16 flip the sign, x1000
    x = torch.cat([honest, attack])
    w = torch.ones(16)
    target = honest.mean(0)
    err = {rule: float((aggregate(x, w, Aggregation(rule)) - target).norm() / target.norm())
           for rule in ("mean", "centered_clip", "median", "trimmed_mean")}
    assert err["mean"] > 100  # the mean follows the attackers
    assert err["centered_clip"] < 0.5 and err["median"] < 0.5
    # trimmed mean with trim=0.2 drops 3 per side: 7 attackers are too many for it (documented)
    assert err["trimmed_mean"] > err["centered_clip"]
    assert float((aggregate(x, w, Aggregation("trimmed_mean", trim=0.45)) - target).norm() / target.norm()) < 0.5


def test_rules_agree_with_the_mean_without_attackers():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 500, generator=gen) * 0.01 + 3.0
    w = torch.ones(8)
    for rule in ("centered_clip", "median", "trimmed_mean"):
        assert torch.allclose(aggregate(x, w, Aggregation(rule)), x.mean(0), atol=0.02), rule
    weights = torch.arange(1.0, 9.0)
    assert torch.allclose(aggregate(x, weights, Aggregation()), (weights[:, None] * x).sum(0) / weights.sum())


def test_aggregation_options_are_checked():
    with pytest.raises(ValueError, match="one of"):
        Aggregation("krum")
    with pytest.raises(ValueError, match="tau"):
        Aggregation("centered_clip", tau=-1.0)
    with pytest.raises(ValueError, match="trim"):
        Aggregation("trimmed_mean", trim=0.5)


# ------------------------------------------------------------------------------------- in a real group

async def test_a_nan_member_cannot_spoil_honest_values(swarm_factory):
    nodes = await swarm_factory(4)
    tensors = [[torch.full((4000,), float(v))] for v in (1, 2, 3)] + [[torch.full((4000,), float("nan"))]]
    cores, results = await group_round(nodes, tensors)
    for core, result in zip(cores[:3], results[:3]):
        value = core.tensors[0]
        assert bool(torch.isfinite(value).all())  # no NaN reached an honest member
        # parts reduced by honest members hold the honest mean; the attacker's part keeps local values
        assert set(value.unique().tolist()) <= {1.0, 2.0, 3.0}
        assert (value == 2.0).any()
    assert sum(c.allreduce.stats["bad_contributions"] for c in cores[:3]) >= 3


async def test_a_reducer_answering_garbage_is_refused_and_banned(swarm_factory):
    nodes = await swarm_factory(4)

    async def liar(event, state):
        if event == "reduced" and state.result is not None:
            state.result = torch.full_like(state.result, float("inf"))

    tensors = [[torch.full((4000,), float(v))] for v in (1, 2, 3, 4)]
    cores, results = await group_round(nodes, tensors, hooks={3: liar})
    for core in cores[:3]:
        assert bool(torch.isfinite(core.tensors[0]).all())
        assert cores[3].peer_id in core.bans
        assert core.allreduce.stats["bad_replies"] == 1


@pytest.mark.parametrize("rule", ["mean", "centered_clip"])
async def test_sign_flipping_member_against_each_rule(swarm_factory, rule):
    nodes = await swarm_factory(5)
    honest = [torch.full((3000,), 1.0) + 0.01 * torch.randn(3000, generator=torch.Generator().manual_seed(i))
              for i in range(4)]
    attacker = -1000.0 * torch.ones(3000)
    cores, results = await group_round(nodes, [[t.clone()] for t in honest] + [[attacker]], aggregation=rule)
    target = torch.stack(honest).mean(0)
    errors = [float((c.tensors[0] - target).abs().max()) for c in cores[:4]]
    if rule == "mean":
        assert min(errors) > 100  # the control: one attacker decides the mean
    else:
        assert max(errors) < 1.0, errors  # clipped: the attacker moves each part by a bounded amount


async def test_a_non_member_with_the_group_id_cannot_inject(swarm_factory):
    nodes = await swarm_factory(3)
    outsider = await DHTNode.create([nodes[0].address])
    seen = {}
    injected = asyncio.Event()

    async def leak(event, state):
        if event == "group" and "gid" not in seen:  # the outsider learns the group id and member list
            seen["gid"], seen["group"] = state.group_id, state
            target, claimed = (state.my_index + 1) % 3, (state.my_index + 2) % 3  # two members other than us
            member = state.members[target]
            seen["claimed"] = claimed
            payload = {"gid": state.group_id, "from": claimed, "w": 1.0, "part": encode(torch.zeros(1), NONE)}
            try:
                await outsider.endpoint.call(member["addr"], "avg.byz.part", payload, timeout=6)
            except RemoteError as e:
                seen["refusal"] = e.remote_message
            injected.set()

    try:
        tensors = [[torch.full((6,), float(v))] for v in (1, 2, 3)]
        cores, results = await group_round(nodes, tensors, hooks={0: leak})
        await asyncio.wait_for(injected.wait(), 5)
        assert f"not member {seen['claimed']}" in seen.get("refusal", ""), seen
        assert all(torch.allclose(c.tensors[0], torch.full((6,), 2.0)) for c in cores)
    finally:
        await outsider.shutdown()


def test_a_huge_declared_bandwidth_buys_a_bounded_share():
    from hivesim.averaging import optimal_shares
    from hivesim.averaging.partition import MAX_THROUGHPUT_RATIO

    from hivesim.averaging.partition import DEFAULT_MAX_SHARE, clamp_throughputs

    assert clamp_throughputs([1e300, 1.0, 1.0, 1.0])[0] == MAX_THROUGHPUT_RATIO
    liar = optimal_shares([1e300, 1.0, 1.0, 1.0], [True] * 4, DEFAULT_MAX_SHARE)
    assert liar[0] <= DEFAULT_MAX_SHARE + 1e-9  # not the whole vector (uncapped, the LP gives it all of it)
    assert optimal_shares([1e300, 1.0, 1.0, 1.0], [True] * 4)[0] == pytest.approx(1.0)
    honest = optimal_shares([1000.0] + [100.0] * 7, [True] * 8, DEFAULT_MAX_SHARE)
    assert honest[0] > 3 * honest[1]  # honest 10x heterogeneity still counts


async def test_a_member_declaring_huge_bandwidth_does_not_reduce_everything(swarm_factory):
    nodes = await swarm_factory(4)
    cores = [AveragerCore(n.endpoint, n, [torch.full((1000,), float(i))], prefix="bwlie", target_group_size=4,
                          matchmaking_time=5.0, bandwidth=1e300 if i == 3 else 1.0) for i, n in enumerate(nodes)]
    for core in cores:
        await core.start()
    results = await asyncio.wait_for(asyncio.gather(*(c.step() for c in cores)), ROUND)
    order = list(results[0])
    sizes = results[0].part_sizes
    assert sizes[order.index(cores[3].peer_id)] <= 500  # before the cap: all 1,000 elements


def test_attacks_corrupt_what_they_say():
    from hivesim.roles.attacks import make_attack

    def grads_of(values):
        p = torch.nn.Parameter(torch.zeros(len(values)))
        p.grad = torch.tensor(values, dtype=torch.float32)
        return [p]

    params = grads_of([1.0, -2.0])
    make_attack("sign_flip").gradients(params)
    assert params[0].grad.tolist() == [-1000.0, 2000.0]
    x, y = make_attack("label_flip").batch((torch.zeros(3, 2), torch.tensor([0, 3, 9])))
    assert y.tolist() == [9, 6, 0]
    a, b = make_attack("random_direction", seed=5), make_attack("random_direction", seed=5)
    pa, pb = grads_of([3.0, 4.0]), grads_of([0.3, 0.4])
    a.gradients(pa)
    b.gradients(pb)
    assert float(pa[0].grad.norm()) == pytest.approx(500.0, rel=1e-5)  # 100x the honest norm (5)
    assert torch.allclose(pa[0].grad / pa[0].grad.norm(), pb[0].grad / pb[0].grad.norm())  # colluding: one direction
    alie = make_attack("alie", num_peers=16, num_byzantine=7)
    for values in ([1.0, 1.0], [3.0, 1.0]):
        p = grads_of(values)
        alie.gradients(p)
    assert p[0].grad[1] == pytest.approx(1.0) and p[0].grad[0] < 2.0  # mean - z * std: small, consistent bias
    assert make_attack(None) is None
    with pytest.raises(ValueError, match="one of"):
        make_attack("bribe")


@pytest.mark.parametrize("rule", ["mean", "centered_clip"])
async def test_a_member_claiming_a_huge_weight_is_clamped(swarm_factory, rule):
    nodes = await swarm_factory(4)
    tensors = [[torch.full((2000,), float(v))] for v in (1.0, 2.0, 3.0)] + [[torch.full((2000,), 100.0)]]
    cores, results = await group_round(nodes, tensors, aggregation=rule, weights=[1.0, 1.0, 1.0, 1e30])
    assert sum(c.allreduce.stats["clamped_weights"] for c in cores) >= 1
    order, sizes = list(results[0]), results[0].part_sizes
    liar = order.index(cores[3].peer_id)
    start = sum(sizes[:liar])
    for core in cores[:3]:
        # the parts honest members reduced (the attacker decides its own part: see docs/security.md)
        value = torch.cat([core.tensors[0][:start], core.tensors[0][start + sizes[liar]:]])
        if rule == "mean":  # weight 1e30 would leave 100.0 everywhere; clamped to 16x the median: (1600+6)/19
            assert float(value.max()) < 90.0
        else:  # a robust rule counts it as one typical member, then clips it
            assert float(value.max()) < 10.0


async def test_members_sign_what_they_declare(swarm_factory):
    from hivesim.averaging.matchmaking import BadRequest, check_ticket, sign_ticket
    from hivesim.net import Identity

    alice, mallory = Identity(), Identity()
    ticket = sign_ticket(alice, "avg.x", {"id": alice.peer_id, "addr": "tcp://a:1", "bw": 1.0, "client": False,
                                          "aux": False, "gather": None, "w": 1.0})
    check_ticket("avg.x", ticket, alice.peer_id)
    for tampered, why in ((dict(ticket, w=1e30), "signature"), (dict(ticket, addr="tcp://evil:1"), "signature"),
                          (dict(ticket, id=mallory.peer_id), "another peer"),
                          ({k: v for k, v in ticket.items() if k not in ("pk", "sig")}, "no signed ticket")):
        with pytest.raises(BadRequest, match=why):
            check_ticket("avg.x", tampered)
    with pytest.raises(BadRequest, match="another peer than the one asking"):
        check_ticket("avg.x", ticket, mallory.peer_id)  # Mallory replays Alice's ticket in her own join
    with pytest.raises(BadRequest, match="signature"):
        check_ticket("avg.y", ticket)  # a ticket for another averager
