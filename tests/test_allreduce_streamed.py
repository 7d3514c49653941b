"""The all-reduce path of big vectors, whose parts are streamed in chunks: averaged parts land straight
in the sender's vector (``Endpoint.call(into=...)``), weight-1 contributions accumulate in place, and a
reply that breaks off mid-stream leaves the sender's local values, not a mix."""

from __future__ import annotations

import asyncio

import pytest
import torch

from hivesim.net.rpc import MiB

from test_averaging import ROUND, check_survivors, cores_for, slow_victim_dies, start, swarm_factory  # noqa: F401

NUMEL = 6 << 20  # three parts of 8 MiB: above the 4 MiB inline limit, so every part is streamed


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 2.0, 1.0)])
async def test_streamed_parts_average_exactly(swarm_factory, weights):
    nodes = await swarm_factory(3)
    values = (4.0, 8.0, 0.0)  # weighted means 4.0 and 5.0: exact in float32
    tensors = [[torch.full((NUMEL // 2,), v), torch.full((NUMEL // 2,), -v)] for v in values]
    cores = await start(cores_for(nodes, tensors, prefix="big", target_group_size=3, matchmaking_time=5.0))
    results = await asyncio.wait_for(asyncio.gather(*(c.step(weight=w) for c, w in zip(cores, weights))), ROUND)
    assert all(r is not None and r.group_size == 3 and r.averaged_fraction == 1.0 for r in results)
    assert all(min(r.part_sizes) * 4 > 4 * MiB for r in results)  # the streamed path was taken
    mean = sum(w * v for w, v in zip(weights, values)) / sum(weights)
    for core in cores:
        with core.get_tensors() as (a, b):
            assert bool((a == mean).all()) and bool((b == -mean).all())


async def test_reply_lands_in_the_callers_buffer(make_endpoint):
    server, client = await make_endpoint(), await make_endpoint()
    server.register("echo", lambda payload, ctx: payload)
    sent = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: streamed
    landing = torch.zeros_like(sent)
    asked = []

    def into(index, nbytes):
        asked.append((index, nbytes))
        return landing.view(torch.uint8)

    got = await client.call(server.address, "echo", sent, into=into)
    assert asked == [(0, sent.numel() * 4)]
    assert got.data_ptr() == landing.data_ptr() and torch.equal(landing, sent)
    # a provider that answers the wrong size, or raises, costs only the shortcut
    for bad in (lambda i, n: torch.zeros(n - 1, dtype=torch.uint8), lambda i, n: 1 / 0, lambda i, n: "nonsense"):
        got = await client.call(server.address, "echo", sent, into=bad)
        assert torch.equal(got, sent) and got.data_ptr() != landing.data_ptr()
    assert not client._into  # nothing is kept for finished calls


async def test_reply_broken_off_mid_stream_keeps_local_values(swarm_factory):
    # the victim's uplink is 16 MB/s: its own three parts of 8 MiB leave in ~1.5 s, then its three replies
    # of 8 MiB stream in 4 MiB chunks for ~1.5 s; it dies 2.2 s in, when a chunk or two of each reply has
    # landed in the other members' vectors (without the `spoiled` bookkeeping they end up half averaged)
    cores, results, elapsed, _ = await slow_victim_dies(swarm_factory, "reduced", 2.2)
    check_survivors(cores, results, elapsed, victim_counted=None)
