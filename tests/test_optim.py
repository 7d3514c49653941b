"""hivesim.Optimizer: exact collaborative steps, epochs in lockstep, failures, modes (real peers on loopback)."""

from __future__ import annotations

import asyncio
import math
from functools import partial

import pytest
import torch

from optim_swarm import BATCH, Swarm, make_model, params_of


@pytest.fixture
def swarm():
    s = Swarm()
    yield s
    s.close()


def reference_step(opt_factory, batches) -> list[torch.Tensor]:
    """One step of a fresh optimizer from the initial model on the sample-weighted mean gradient of ``batches``."""
    model = make_model()
    opt = opt_factory(model.parameters())
    total = sum(len(x) for x, _ in batches)
    grads = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in batches:
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        for g, p in zip(grads, model.parameters()):
            g.add_(p.grad, alpha=len(x) / total)
    for g, p in zip(grads, model.parameters()):
        p.grad = g
    opt.step()
    return params_of(model)


@pytest.mark.parametrize("factory", [partial(torch.optim.SGD, lr=0.1), partial(torch.optim.Adam, lr=0.01)],
                         ids=["sgd", "adam"])
def test_epoch_equals_one_step_on_the_average_gradient(swarm, factory):
    trainers = [swarm.trainer(optimizer=factory) for _ in range(3)]
    for t in trainers:
        swarm.run(t, lambda t: t.opt.local_epoch >= 1)
    swarm.join_all()
    batches = [(x, y) for t in trainers for epoch, x, y in t.batches if epoch == 0]
    assert len(batches) >= 18  # the target is 3 peers x 6 steps
    expected = reference_step(factory, batches)
    for t in trainers:
        report = t.opt.last_epoch_report
        assert report.averaged and report.group_size == 3, report
        for mine, ref in zip(params_of(t.model), expected):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    first = params_of(trainers[0].model)
    for t in trainers[1:]:
        for a, b in zip(first, params_of(t.model)):
            assert torch.equal(a, b)  # bit for bit: every peer applied the same averaged gradient


def test_epochs_advance_together_with_a_slow_peer(swarm):
    target = 3 * BATCH * 12
    trainers = [swarm.trainer(target_batch_size=target) for _ in range(3)]
    for i, t in enumerate(trainers):
        swarm.run(t, lambda t: t.opt.local_epoch >= 4, step_time=0.15 if i == 0 else 0.05)  # peer 0 is 3x slower
    swarm.join_all()
    for epoch in range(4):
        per_peer = [sum(len(x) for e, x, _ in t.batches if e == epoch) for t in trainers]
        assert per_peer[0] < min(per_peer[1:])  # the slow peer contributed less...
        if epoch > 0:  # (epoch 0 starts before peers have seen each other's progress)
            assert target * 0.9 <= sum(per_peer) <= target * 1.1, (epoch, per_peer)
    for t in trainers:
        assert t.opt.local_epoch == 4
        assert all(r.averaged and r.group_size == 3 for r in t.opt.epoch_reports), t.opt.epoch_reports


def test_a_peer_killed_during_gradient_averaging(swarm):
    killed = []

    async def kill_in_group(event, state):
        if event == "group" and not killed:
            killed.append(True)
            asyncio.ensure_future(victim.dht.node.shutdown())  # vanish: sockets closed, no goodbye

    trainers = [swarm.trainer() for _ in range(3)]
    victim = swarm.trainer(averager_opts={"fault_hook": kill_in_group})
    for t in trainers:
        swarm.run(t, lambda t: t.opt.local_epoch >= 2)
    swarm.run(victim, lambda t: bool(killed), limit=30)
    swarm.join_all(timeout=120)
    assert killed
    for t in trainers:
        assert t.opt.local_epoch == 2
        first = t.opt.epoch_reports[0]
        assert first.expected_peers == 4 and first.group_size >= 3  # the victim was in the group
        assert first.seconds < 30  # nothing hung on the dead member
        second = t.opt.epoch_reports[1]
        assert second.averaged and second.group_size == 3, t.opt.epoch_reports  # the survivors go on together
        for p in t.model.parameters():
            assert torch.isfinite(p).all()


def test_newcomer_downloads_state_from_several_donors(swarm):
    factory = partial(torch.optim.Adam, lr=0.01)
    donors = [swarm.trainer(optimizer=factory, scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
              for _ in range(3)]
    for t in donors:
        swarm.run(t, lambda t: t.opt.local_epoch >= 2)
    swarm.join_all()
    newcomer = swarm.trainer(optimizer=factory, scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    assert newcomer.opt.global_epoch == 2
    swarm.run(newcomer, lambda t: t.opt.state_downloads >= 1, limit=30)
    swarm.join_all()
    assert newcomer.opt.local_epoch == 2
    assert len(newcomer.opt.last_download["donors"]) >= 2  # shares came from several donors
    reference = donors[0]
    with reference.opt._state_lock:
        for mine, theirs in zip(params_of(newcomer.model), params_of(reference.model)):
            assert torch.equal(mine, theirs)
        ref_state = reference.opt.opt.state_dict()
    got_state = newcomer.opt.opt.state_dict()
    for index, entries in ref_state["state"].items():
        for name, value in entries.items():
            assert torch.equal(got_state["state"][index][name], value), name
    assert newcomer.opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 2)  # scheduler state came along


def test_download_survives_a_donor_killed_mid_download(swarm):
    from hivesim.optim import download_state

    donors = [swarm.trainer() for _ in range(3)]
    for t in donors:
        swarm.run(t, lambda t: t.opt.local_epoch >= 1)
    swarm.join_all()
    victim = donors[1]
    part_method = victim.opt.state_server.part_method

    async def die(payload, ctx):
        asyncio.ensure_future(victim.dht.node.shutdown())  # dies while asked for its share
        await asyncio.sleep(1)

    victim.dht.run_coroutine(lambda _d, node: _register(node.endpoint, part_method, die))
    newcomer = swarm.dht()
    got = newcomer.run_coroutine(lambda _d, node: download_state(node.endpoint, node, "test_run", timeout=30,
                                                                 request_timeout=3.0))
    assert got.epoch == 1 and got.failed_donors >= 1
    assert victim.dht.peer_id not in got.donors
    for i, p in enumerate(donors[0].model.parameters()):
        assert torch.equal(got.tensors[f"param.{i}"], p.detach())


async def _register(endpoint, name, handler):
    endpoint.register(name, handler, replace=True)


def test_local_updates_average_parameters_every_epoch(swarm):
    trainers = [swarm.trainer(use_local_updates=True, target_batch_size=2 * BATCH * 12) for _ in range(2)]
    for t in trainers:
        swarm.run(t, lambda t: t.opt.local_epoch >= 2)
    swarm.join_all()
    for t in trainers:
        assert [r.averaged for r in t.opt.epoch_reports] == [True, True]
    a, b = (params_of(t.model) for t in trainers)
    for x, y in zip(a, b):  # just averaged (weighted by samples), nobody stepped since
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_delayed_updates_train_one_epoch_stale(swarm):
    trainers = [swarm.trainer(delay_optimizer_step=True, delay_grad_averaging=True, target_batch_size=2 * BATCH * 12,
                              matchmaking_time=6.0)  # background rounds start a step apart: room to meet
                for _ in range(2)]
    start = params_of(trainers[0].model)
    for t in trainers:
        swarm.run(t, lambda t: t.opt.local_epoch >= 3)
    swarm.join_all()
    for t in trainers:
        t.opt._wait_pending_step()
        assert len(t.opt.epoch_reports) == 3
        # (the last round runs after both threads stopped stepping; in about one run of ten its two peers miss
        # each other there: a known gap of the delayed mode, left open)
        assert all(r.averaged for r in t.opt.epoch_reports[:-1]), t.opt.epoch_reports
    a, b = (params_of(t.model) for t in trainers)
    last_averaged = all(t.opt.epoch_reports[-1].averaged for t in trainers)
    for x, y, s in zip(a, b, start):
        if last_averaged:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        assert torch.isfinite(x).all() and not torch.equal(x, s)  # the model moved


def test_client_mode_and_auxiliary_peers_take_part(swarm):
    normal = [swarm.trainer() for _ in range(2)]
    client = swarm.trainer(client_mode=True)
    aux = swarm.trainer(auxiliary=True)
    for t in normal + [client]:
        swarm.run(t, lambda t: t.opt.local_epoch >= 2)
    swarm.run(aux, lambda t: t.opt.local_epoch >= 2)
    swarm.join_all()
    assert client.opt.client_mode and client.opt.grad_averager.matchmaker.client_mode
    for t in normal + [client, aux]:
        assert [r.group_size for r in t.opt.epoch_reports][-1] == 4, t.opt.epoch_reports
    assert aux.opt.epoch_reports[-1].samples == 0  # the helper contributed no gradients
    for x, y in zip(params_of(normal[0].model), params_of(client.model)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_compressed_gradients_stay_close_to_exact(swarm):
    factory = partial(torch.optim.SGD, lr=0.1)
    trainers = [swarm.trainer(optimizer=factory, grad_compression="float16") for _ in range(3)]
    for t in trainers:
        swarm.run(t, lambda t: t.opt.local_epoch >= 1)
    swarm.join_all()
    expected = reference_step(factory, [(x, y) for t in trainers for e, x, y in t.batches if e == 0])
    initial = params_of(make_model())
    for t in trainers:
        assert t.opt.last_epoch_report.averaged
        for mine, ref, init in zip(params_of(t.model), expected, initial):
            step = (ref - init).abs().max()
            assert (mine - ref).abs().max() <= 2e-3 * max(1.0, float(step)) + 1e-4  # float16 error, bounded


def test_scheduler_steps_once_per_global_epoch_and_state_dict_round_trips(swarm):
    sched = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    trainers = [swarm.trainer(scheduler=sched) for _ in range(2)]
    for t in trainers:
        swarm.run(t, lambda t: t.opt.local_epoch >= 3)
    swarm.join_all()
    for t in trainers:
        assert t.opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 3)
    state = trainers[0].opt.state_dict()
    assert state["state"]["local_epoch"] == 3
    fresh = swarm.trainer(run_id="other_run")
    fresh.opt.load_state_dict(state)
    assert fresh.opt.local_epoch == 3
    assert fresh.opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 3)


def test_progress_and_donor_records_cannot_be_forged(swarm):
    from hivesim import owner_marker
    from hivesim.dht.storage import get_dht_time
    from hivesim.optim import find_donors

    honest = swarm.trainer()
    swarm.run(honest, lambda t: t.opt.local_epoch >= 1)
    swarm.join_all()
    attacker = swarm.dht()
    victim_subkey = owner_marker(honest.dht.public_key)
    forged = {"epoch": 10**6, "samples": 0, "sps": 0.0, "time": get_dht_time(), "client": False, "aux": False}
    # the attacker cannot write under the honest peer's owned subkey (its signature would not match)...
    with pytest.raises(Exception):
        attacker.store("test_run_progress", forged, get_dht_time() + 60, subkey=victim_subkey)
    # ...and a record it writes under an unowned subkey is ignored by every reader, as is a forged donor
    assert attacker.store("test_run_progress", forged, get_dht_time() + 60, subkey="anybody")
    assert attacker.store("test_run_donors", {"addr": attacker.get_visible_addresses()[0], "epoch": 10**6},
                          get_dht_time() + 60, subkey="anybody")
    progress = honest.dht.run_coroutine(lambda _d, _n: honest.opt.tracker.refresh())
    assert progress.epoch == 1 and honest.opt.tracker.ignored_records >= 1
    donors = honest.dht.run_coroutine(lambda _d, node: find_donors(node, "test_run"))
    assert [d.peer_id for d in donors] == [honest.dht.peer_id] and donors[0].epoch == 1


def test_memory_does_not_grow_over_50_epochs(swarm):
    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def wide_model() -> torch.nn.Module:  # ~1 MiB of parameters: a copy kept per epoch would show at once
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512),
                                   torch.nn.Linear(512, 1))

    peers = [swarm.trainer(model=wide_model(), optimizer=partial(torch.optim.Adam, lr=1e-4),
                           target_batch_size=2 * BATCH) for _ in range(2)]
    rss: dict[int, float] = {}

    def until(t) -> bool:
        epoch = t.opt.local_epoch
        mark = 50 if epoch >= 50 else 10 if epoch >= 10 else None
        if mark is not None and mark not in rss:  # (RSS is the whole process's: whichever peer gets there first)
            rss[mark] = rss_mib()
        return epoch >= 50

    for t in peers:
        swarm.run(t, until, step_time=0.002, limit=150)
    swarm.join_all(timeout=170)
    assert peers[0].opt.local_epoch >= 50 and set(rss) == {10, 50}
    # 40 epochs: a leak of one model copy (plus Adam's two) per epoch would add ~120 MiB
    assert rss[50] - rss[10] < 30, rss


def test_a_donor_whose_manifest_does_not_fit_is_passed_over_before_any_download(swarm):
    from hivesim import owner_marker
    from hivesim.dht.storage import get_dht_time

    honest = swarm.trainer()
    swarm.run(honest, lambda t: t.opt.local_epoch >= 1)
    swarm.join_all()
    liar = swarm.dht()
    asked_for_parts = []

    async def info(payload, ctx):  # claims a 4 GB parameter at a more advanced epoch than anyone
        return {"epoch": 7, "meta": {"optimizer": None, "scheduler": None}, "names": ["param.0"],
                "shapes": [[1 << 30]], "dtypes": ["float32"]}

    async def part(payload, ctx):
        asked_for_parts.append(payload)
        raise ValueError("never reached")

    async def serve(_dht, node):
        node.endpoint.register("optim.test_run.state_info", info)
        node.endpoint.register("optim.test_run.state_part", part)
        await node.store("test_run_donors", {"addr": node.address, "epoch": 7}, get_dht_time() + 60,
                         subkey=owner_marker(node.public_key))

    liar.run_coroutine(serve)
    newcomer = swarm.trainer()
    assert newcomer.opt.load_state_from_peers(timeout=20)
    assert newcomer.opt.local_epoch == 1 and newcomer.opt.last_download["donors"] == [honest.dht.peer_id]
    assert not asked_for_parts  # refused from the manifest alone
