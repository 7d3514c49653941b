"""RemoteMixtureOfExperts against real expert servers on loopback: exact beam search, failures, k_min,
all-dead behaviour, a host killed mid-training, switch routing."""

from __future__ import annotations

import itertools
import random
import threading
import time

import numpy as np
import pytest
import torch

from hivesim.moe import (ExpertServer, MoEBeamSearcher, NoExpertsAvailable, RemoteMixtureOfExperts,
                         RemoteSwitchMixtureOfExperts)
from hivesim.moe.runtime import ExpertBackend
from tests.moe_swarm import RaisingExpert, scaled, swarm


def test_beam_search_finds_the_true_top_k_alive_experts():
    rng = random.Random(0)
    grid = (4, 5, 3)
    all_uids = [f"g.{a}.{b}.{c}" for a, b, c in itertools.product(*(range(n) for n in grid))]
    with swarm() as s:
        alive = set()
        for h in range(3):  # three hosts, each with a random third of a random half of the grid
            uids = rng.sample(all_uids, 10)
            alive |= set(uids)
            s.host({u: scaled(u, 2, 1.0) for u in uids})
        client = s.client()
        searcher = MoEBeamSearcher(client.node, "g", grid)
        gen = np.random.default_rng(1)
        scores = [gen.normal(size=(16, g)) for g in grid]  # continuous: no ties
        for k in (1, 4, 7):
            found = client.run_coroutine(lambda d, n: searcher.find_best_experts(scores, k))
            for b in range(16):
                truth = sorted(alive, key=lambda u: -sum(scores[d][b, int(c)] for d, c in enumerate(u.split(".")[1:])))[:k]
                assert [e.uid for e in found[b]] == truth
                assert all(e.address for e in found[b])
        assert searcher.lookups <= 1 + 4 + 4 * 5  # every prefix at most once: the cache answers the rest
        assert searcher.cache_hits > 0


def _expected(moe, x, scales_by_uid, answered):
    """Gate-weighted average over the experts that answer, computed from the layer's own gate."""
    with torch.no_grad():
        scores = moe.proj(x).split(list(moe.grid_size), dim=1)
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            logits = {u: sum(scores[d][b, int(c)] for d, c in enumerate(u.split(".")[1:])) for u in answered}
            w = torch.softmax(torch.stack(list(logits.values())), 0)
            out[b] = sum(wi * scales_by_uid[u] * x[b] for wi, u in zip(w, logits))
    return out


def test_dead_slow_and_raising_experts_are_skipped_and_the_rest_is_right():
    torch.manual_seed(0)
    with swarm() as s:
        scales = {"m.0.0": 1.0, "m.0.1": 2.0, "m.1.0": -1.0}
        s.host({u: scaled(u, 4, v, lr=0.1) for u, v in scales.items()})
        s.host({"m.1.1": scaled("m.1.1", 4, 5.0, delay=3.0)})  # slow past the timeout
        s.host({"m.2.0": ExpertBackend("m.2.0", RaisingExpert(4), None, (4,), "test_raising", 4, "cpu")})
        dead = s.host({"m.2.1": scaled("m.2.1", 4, 7.0)})
        s.kill(dead)  # declared, then gone without a word
        moe = RemoteMixtureOfExperts(4, (3, 2), s.client(), "m", k_best=6, forward_timeout=1.0)
        x = torch.randn(5, 4, requires_grad=True)
        t0 = time.monotonic()
        y = moe(x)
        assert time.monotonic() - t0 < 2.5
        assert torch.allclose(y, _expected(moe, x, scales, list(scales)), atol=1e-5)
        assert moe.stats["forward_failures"] + moe.stats["forward_late"] == 3  # slow, raising, dead
        y.sum().backward()  # only the three good experts get a backward, and it succeeds
        assert x.grad is not None and moe.proj.weight.grad is not None
        assert moe.stats.get("backward_failures", 0) == 0


def test_k_min_and_timeout_after_k_min():
    with swarm() as s:
        s.host({"k.0": scaled("k.0", 3, 1.0)})
        s.host({"k.1": scaled("k.1", 3, 3.0, delay=0.7)})
        client = s.client()
        x = torch.randn(4, 3)
        quick = RemoteMixtureOfExperts(3, (2,), client, "k", k_best=2, k_min=1, timeout_after_k_min=0.05)
        t0 = time.monotonic()
        y = quick(x)
        assert time.monotonic() - t0 < 0.5
        assert torch.allclose(y, x, atol=1e-6)  # only the fast expert (scale 1) answered in time
        patient = RemoteMixtureOfExperts(3, (2,), client, "k", k_best=2, k_min=2, timeout_after_k_min=0.05)
        t0 = time.monotonic()
        y = patient(x)
        assert time.monotonic() - t0 >= 0.6
        assert torch.allclose(y, _expected(patient, x, {"k.0": 1.0, "k.1": 3.0}, ["k.0", "k.1"]), atol=1e-5)


def test_all_experts_dead_is_a_clear_error_or_zeros():
    with swarm() as s:
        host = s.host({f"z.{i}": scaled(f"z.{i}", 3, 1.0) for i in range(2)})
        client = s.client()
        strict = RemoteMixtureOfExperts(3, (2,), client, "z", k_best=2, forward_timeout=2.0)
        lenient = RemoteMixtureOfExperts(3, (2,), client, "z", k_best=2, forward_timeout=2.0, allow_zero_outputs=True)
        x = torch.randn(2, 3, requires_grad=True)
        assert torch.allclose(strict(x), x)
        s.kill(host)
        with pytest.raises(NoExpertsAvailable, match="2 of 2 samples"):
            strict(x)
        y = lenient(x)
        assert torch.equal(y, torch.zeros(2, 3))
        y.sum().backward()  # no expert to call: gradients are zero, nothing hangs
        nobody = RemoteMixtureOfExperts(3, (2,), client, "nobody", k_best=2)
        with pytest.raises(NoExpertsAvailable):
            nobody(x)


def test_a_host_killed_mid_training_does_not_stop_training():
    torch.manual_seed(0)
    with swarm() as s:
        first = s.host(ExpertServer.create("t.[0:2].[0:2]", "ffn", 8, seed=0))
        s.host(ExpertServer.create("t.[2:4].[0:2]", "ffn", 8, seed=10))
        moe = RemoteMixtureOfExperts(8, (4, 2), s.client(), "t", k_best=3, forward_timeout=2.0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), moe, torch.nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        data = torch.randn(64, 8)
        target = data[:, :1] * 2 - data[:, 1:2]
        losses = []
        for step in range(40):
            if step == 15:
                s.kill(first)
            loss = ((model(data) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert moe.stats["forward_failures"] >= 1  # it did hit the dead host ...
        assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])  # ... and kept learning


def test_switch_mixture_routes_each_sample_to_one_expert_and_balances():
    torch.manual_seed(0)
    with swarm() as s:
        s.host({f"s.{i}.{j}": scaled(f"s.{i}.{j}", 4, 1.0 + i + 2 * j, lr=0.01) for i in range(2) for j in range(2)})
        moe = RemoteSwitchMixtureOfExperts(4, (2, 2), s.client(), "s")
        x = torch.randn(32, 4, requires_grad=True)
        y, balance = moe(x)
        assert y.shape == (32, 4) and balance.item() > 0
        (y.sum() + balance).backward()
        assert x.grad is not None and moe.proj.weight.grad.abs().sum() > 0
        assert all(abs(float(u.sum()) - 1) < 1e-5 for u in moe.grid_utilization)


def test_layer_called_from_its_own_loop_raises_instead_of_deadlocking():
    with swarm() as s:
        s.host({"l.0": scaled("l.0", 2, 1.0)})
        client = s.client()
        moe = RemoteMixtureOfExperts(2, (1,), client, "l", k_best=1)

        async def inside(dht, node):
            moe(torch.randn(1, 2))

        with pytest.raises(RuntimeError, match="executor"):
            client.run_coroutine(inside)
        assert threading.active_count() < 50
