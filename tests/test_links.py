"""The link model, measured on real sockets: what a topology configures is what peers observe."""

import asyncio
import time

import pytest
import torch

from hivesim.net import RPCTimeout, ShapedLinks, TokenBucket

MB = 10**6


async def sink(payload, ctx):
    return None


async def pair(make_endpoint, a_links, b_links):
    a = await make_endpoint(links=a_links)
    b = await make_endpoint(links=b_links)
    for endpoint in (a, b):
        endpoint.register("sink", sink)
    return a, b


async def test_latency_shows_in_round_trips(make_endpoint):
    table = {("a", "b"): 0.05}  # given one way, used both ways
    a, b = await pair(make_endpoint, ShapedLinks("a", table), ShapedLinks("b", table))
    await a.call(b.address, "sink")  # connect first
    times = []
    for _ in range(5):
        start = time.monotonic()
        await a.call(b.address, "sink")
        times.append(time.monotonic() - start)
    assert min(times) >= 0.100, times
    assert max(times) < 0.200, times


async def test_uplink_bandwidth_limits_and_is_shared(make_endpoint):
    a, b = await pair(make_endpoint, ShapedLinks("a", uplink=10 * MB), ShapedLinks("b"))
    await a.call(b.address, "sink")
    payload = torch.zeros(10 * MB, dtype=torch.uint8)
    start = time.monotonic()
    await a.call(b.address, "sink", payload)
    one = time.monotonic() - start
    assert 0.85 <= one <= 1.4, one

    async def timed():
        t0 = time.monotonic()
        await a.call(b.address, "sink", payload)
        return time.monotonic() - t0

    both = await asyncio.gather(timed(), timed())
    assert 1.8 <= max(both) <= 2.6, both  # 20 MB through one 10 MB/s uplink
    assert min(both) >= 1.2, both  # chunks interleave: neither gets the link to itself


async def test_receiver_downlink_counts(make_endpoint):
    a, b = await pair(make_endpoint, ShapedLinks("a"), ShapedLinks("b", downlink=10 * MB))
    await a.call(b.address, "sink")
    start = time.monotonic()
    await a.call(b.address, "sink", torch.zeros(5 * MB, dtype=torch.uint8))
    assert 0.42 <= time.monotonic() - start <= 0.9


async def test_jitter_spreads_latency(make_endpoint):
    a, b = await pair(make_endpoint, ShapedLinks("a", 0.01, jitter=0.04, seed=1), ShapedLinks("b", 0.01, jitter=0.04, seed=2))
    await a.call(b.address, "sink")
    times = []
    for _ in range(12):
        start = time.monotonic()
        await a.call(b.address, "sink")
        times.append(time.monotonic() - start)
    assert min(times) >= 0.02
    assert max(times) - min(times) > 0.015  # not a constant delay
    assert max(times) < 0.2


async def test_loss_and_partitions(make_endpoint):
    lossy = ShapedLinks("b", loss=0.5, seed=3)
    a, b = await pair(make_endpoint, ShapedLinks("a"), lossy)
    outcomes = []
    for _ in range(24):
        try:
            await a.call(b.address, "sink", timeout=0.15)
            outcomes.append(True)
        except RPCTimeout:
            outcomes.append(False)
    assert 4 <= sum(outcomes) <= 20, outcomes  # about half get through, seeded
    lossy.loss = 0.0
    lossy.blocked.add(frozenset(("a", "b")))
    with pytest.raises(RPCTimeout):
        await a.call(b.address, "sink", timeout=0.2)
    lossy.blocked.clear()
    await a.call(b.address, "sink", timeout=1.0)


def test_token_bucket_books_bytes_in_order():
    bucket = TokenBucket(rate=1000.0, burst=100.0)
    now = time.monotonic()
    assert bucket.reserve(100, now) == pytest.approx(now)  # the burst goes at once
    assert bucket.reserve(1000, now) == pytest.approx(now + 1.0)  # then the rate applies
    assert bucket.reserve(500, now) == pytest.approx(now + 1.5)  # queued behind the first
    assert bucket.reserve(10, now + 10) == pytest.approx(now + 10)  # refilled after idle time


def test_links_reject_nonsense():
    with pytest.raises(ValueError):
        ShapedLinks("a", loss=1.5)
    with pytest.raises(ValueError):
        ShapedLinks("a", jitter=-1)
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


async def test_identity_links_add_nothing(make_endpoint):
    a, b = await make_endpoint(), await make_endpoint()
    b.register("ctx", lambda payload, ctx: ctx.src)
    assert await a.call(b.address, "ctx") == ""  # no shaping stamp in deployment
