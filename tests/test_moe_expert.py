"""Expert servers and remote experts: equality with the local module, typed errors, hostile requests,
checkpoints, re-declaration."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from hivesim import DHT, RemoteError
from hivesim.moe import (ExpertFailed, ExpertServer, ExpertTimeout, ExpertUnreachable, MoEBeamSearcher,
                         RemoteExpert)
from tests.moe_swarm import scaled, swarm


def test_remote_expert_forward_backward_equal_the_local_module():
    torch.manual_seed(0)
    with swarm() as s:
        server = s.host(ExpertServer.create(["ffn.0.0"], "ffn", 16, optimizer=lambda p: torch.optim.SGD(p, lr=0.1)))
        local = copy.deepcopy(server.backends["ffn.0.0"].module)
        expert = RemoteExpert("ffn.0.0", server.address, dht=s.client())
        x = torch.randn(5, 16, requires_grad=True)
        x_local = x.detach().clone().requires_grad_(True)
        target = torch.randn(5, 16)
        y = expert(x)
        y_local = local(x_local)
        assert torch.allclose(y, y_local, atol=1e-5)
        ((y - target) ** 2).sum().backward()
        ((y_local - target) ** 2).sum().backward()
        assert torch.allclose(x.grad, x_local.grad, atol=1e-5)
        # the server took one SGD step with the same parameter gradients the local module got
        remote_params = dict(server.backends["ffn.0.0"].module.named_parameters())
        for name, p in local.named_parameters():
            assert torch.allclose(remote_params[name].detach(), p.detach() - 0.1 * p.grad, atol=1e-5), name
        assert expert.info()["backwards"] == 1


def test_remote_expert_errors_are_typed():
    with swarm() as s:
        server = s.host({"d.0": scaled("d.0", 4, 1.0, delay=0.6)})
        client = s.client()
        with pytest.raises(ExpertFailed) as info:
            RemoteExpert("nope.0", server.address, dht=client)(torch.randn(2, 4))
        assert info.value.remote_type == "UnknownExpert"
        with pytest.raises(ExpertTimeout):
            RemoteExpert("d.0", server.address, dht=client, forward_timeout=0.2)(torch.randn(2, 4))
        with pytest.raises(ExpertUnreachable):
            RemoteExpert("d.0", "tcp://127.0.0.1:1", dht=client, forward_timeout=2)(torch.randn(2, 4))
        with pytest.raises(ExpertFailed) as info:
            RemoteExpert("d.0", server.address, dht=client)(torch.randn(2, 5))
        assert info.value.remote_type == "BadExpertRequest"


def test_malformed_requests_get_errors_and_the_server_keeps_serving():
    with swarm() as s:
        server = s.host({"d.0": scaled("d.0", 4, 2.0)}, max_request_samples=64)
        client = s.client()

        async def call(method, payload):
            try:
                return await client.node.endpoint.call(server.address, method, payload, timeout=5)
            except RemoteError as e:
                return e.remote_type

        def ask(method, payload):
            return client.run_coroutine(lambda dht, node: call(method, payload))

        assert ask("moe.forward", "not a map") == "BadExpertRequest"
        assert ask("moe.forward", {"uid": 5, "x": torch.ones(1, 4)}) == "UnknownExpert"
        assert ask("moe.forward", {"uid": "d.0", "x": [1, 2, 3]}) == "BadExpertRequest"
        assert ask("moe.forward", {"uid": "d.0", "x": torch.ones(2, 4, dtype=torch.int64)}) == "BadExpertRequest"
        assert ask("moe.forward", {"uid": "d.0", "x": torch.ones(2, 7)}) == "BadExpertRequest"
        assert ask("moe.forward", {"uid": "d.0", "x": torch.ones(100, 4)}) == "BadExpertRequest"
        assert ask("moe.forward", {"uid": "d.0", "x": torch.ones(0, 4)}) == "BadExpertRequest"
        assert ask("moe.backward", {"uid": "d.0", "x": torch.ones(2, 4), "g": torch.ones(3, 4)}) == "BadExpertRequest"
        assert ask("moe.backward", {"uid": "d.0", "x": torch.ones(2, 4), "g": torch.ones(2, 5)}) == "ValueError"
        assert ask("moe.info", None) == "BadExpertRequest"
        assert server.runtime.running
        reply = ask("moe.forward", {"uid": "d.0", "x": torch.ones(3, 4)})
        assert torch.equal(reply["y"], torch.full((3, 4), 2.0))
        assert ask("moe.info", {"uid": "d.0"})["sample_shape"] == [4]


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    with swarm() as s:
        first = s.host(ExpertServer.create(["ffn.0", "ffn.1"], "ffn", 8, checkpoint_dir=tmp_path))
        client = s.client()
        for uid in ("ffn.0", "ffn.1"):
            RemoteExpert(uid, first.address, dht=client)(torch.randn(4, 8)).pow(2).sum().backward()
        trained = {uid: copy.deepcopy(b.state()) for uid, b in first.backends.items()}
        first.shutdown()  # saves
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ffn.0.pt", "ffn.1.pt"]
        torch.manual_seed(99)  # fresh weights, different from the trained ones
        second = s.host(ExpertServer.create(["ffn.0", "ffn.1"], "ffn", 8, checkpoint_dir=tmp_path))
        for uid, state in trained.items():
            restored = second.backends[uid].state()
            for name, tensor in state["module"].items():
                assert torch.equal(restored["module"][name], tensor), name
            assert restored["optimizer"]["state"][0]["step"] == state["optimizer"]["state"][0]["step"] == 1
            assert torch.equal(restored["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
            assert restored["backwards"] == 1


def test_redeclaration_keeps_experts_findable_and_a_stopped_server_drops_out():
    with swarm() as s:
        alive = s.host({f"e.0.{i}": scaled(f"e.0.{i}", 2, 1.0) for i in range(2)}, expiration=2.0, update_period=0.5)
        gone = s.host({"e.1.0": scaled("e.1.0", 2, 1.0)}, expiration=2.0, update_period=0.5)
        client = s.client()
        searcher = MoEBeamSearcher(client.node, "e", (2, 2), cache_ttl=0.0)

        def found():
            scores = [torch.zeros(1, 2).numpy(), torch.zeros(1, 2).numpy()]
            return {e.uid for e in client.run_coroutine(lambda d, n: searcher.find_best_experts(scores, 4))[0]}

        assert found() == {"e.0.0", "e.0.1", "e.1.0"}
        gone.shutdown()  # stops re-declaring
        time.sleep(4.5)  # > twice the expiration: only re-declared experts are still there
        seen = found()
        for _ in range(5):  # on a loaded machine a re-declaration may land late: look again shortly
            if seen == {"e.0.0", "e.0.1"}:
                break
            time.sleep(0.3)
            seen = found()
        assert seen == {"e.0.0", "e.0.1"}
        assert alive.declarations >= 6


def test_expert_types_by_name_including_a_registered_custom_one():
    import hivesim
    from hivesim.moe import EXPERT_CLASSES, make_expert

    assert {"ffn", "residual_ffn", "transformer", "delay", "test_raising"} <= set(EXPERT_CLASSES)
    with pytest.raises(ValueError, match="unknown expert class"):
        make_expert("nope", 4)
    assert hivesim.RemoteMixtureOfExperts is not None and hivesim.ExpertServer is ExpertServer
    torch.manual_seed(0)
    with swarm() as s:
        server = s.host(ExpertServer.create(["tr.0", "bad.0"], "transformer", 16))
        server.backends["bad.0"].module = make_expert("test_raising", 16)
        client = s.client()
        x = torch.randn(2, 16, 16)
        y = RemoteExpert("tr.0", server.address, dht=client)(x)
        assert torch.allclose(y, server.backends["tr.0"].module(x), atol=1e-5)
        with pytest.raises(ExpertFailed, match="this expert is broken"):
            RemoteExpert("bad.0", server.address, dht=client)(x)


async def test_runtime_pools_concurrent_requests_into_batches():
    import asyncio

    from hivesim.moe import Runtime

    backend = scaled("p.0", 3, 2.0, delay=0.2)
    runtime = Runtime({"p.0": backend}, max_batch_size=8)
    runtime.start()
    try:
        first = asyncio.ensure_future(runtime.forward("p.0", torch.ones(1, 3)))
        for _ in range(200):  # wait until the runtime thread has taken the first request (now busy with it)
            if runtime._queue.empty():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)
        rest = [asyncio.ensure_future(runtime.forward("p.0", torch.full((2, 3), float(i)))) for i in range(6)]
        outputs = await asyncio.gather(first, *rest)
        assert torch.equal(outputs[0], torch.full((1, 3), 2.0))
        for i, y in enumerate(outputs[1:]):
            assert torch.equal(y, torch.full((2, 3), 2.0 * i))  # each caller gets its own rows back
        # 1 + 6 requests: the first alone, then 4 (8 samples) pooled, then the last 2
        assert runtime.stats.requests == 7 and runtime.stats.batches == 3 and runtime.stats.samples == 13
        assert runtime.stats.compute_seconds >= 0.6
    finally:
        runtime.stop()
