"""The RPC layer on real ZeroMQ sockets over loopback."""

import asyncio
import gc
import os
import resource
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import zmq

from hivesim.net import BadMessage, Endpoint, PeerUnreachable, RemoteError, RPCError, RPCTimeout
from hivesim.net.limits import shared_context
from tests.conftest import DEAD_ADDRESS


async def echo(payload, ctx):
    return payload


async def test_call_returns_reply_and_address_is_readable(make_endpoint):
    server, client = await make_endpoint(), await make_endpoint()
    assert server.address.startswith("tcp://127.0.0.1:") and server.port > 0
    server.register("echo", echo)
    server.register("add", lambda payload, ctx: payload["a"] + payload["b"])  # sync handlers work too
    payload = {"t": torch.arange(6.0).reshape(2, 3), "s": "hi", "n": [1, 2]}
    reply = await client.call(server.address, "echo", payload)
    assert torch.equal(reply["t"], payload["t"]) and reply["s"] == "hi" and reply["n"] == [1, 2]
    assert await client.call(server.address, "add", {"a": 2, "b": 3}) == 5
    assert server.stats["calls_served"] == 2


async def test_duplicate_handler_names_are_refused(make_endpoint):
    server = await make_endpoint()
    server.register("x", echo)
    with pytest.raises(ValueError, match="already registered"):
        server.register("x", echo)
    server.register("x", echo, replace=True)


async def test_typed_errors(make_endpoint):
    server, client = await make_endpoint(), await make_endpoint()

    async def fail(payload, ctx):
        raise KeyError("missing thing")

    async def slow(payload, ctx):
        await asyncio.sleep(10)

    server.register("fail", fail)
    server.register("slow", slow)
    with pytest.raises(RemoteError) as info:
        await client.call(server.address, "fail")
    assert info.value.remote_type == "KeyError" and "missing thing" in info.value.remote_message
    with pytest.raises(RemoteError) as info:
        await client.call(server.address, "no_such_method")
    assert info.value.remote_type == "UnknownMethod"
    start = time.monotonic()
    with pytest.raises(RPCTimeout):
        await client.call(server.address, "slow", timeout=0.3)
    assert 0.25 < time.monotonic() - start < 2.0
    with pytest.raises(PeerUnreachable, match="refused"):
        await client.call(DEAD_ADDRESS, "echo", timeout=5)
    with pytest.raises(PeerUnreachable, match="not a peer address"):
        await client.call("localhost:1234", "echo")
    # the server is still fine after all that
    server.register("echo", echo)
    assert await client.call(server.address, "echo", 7) == 7


async def test_peer_dying_mid_call_fails_fast(make_endpoint):
    server, client = await make_endpoint(), await make_endpoint()

    async def slow(payload, ctx):
        await asyncio.sleep(30)

    server.register("slow", slow)
    call = asyncio.ensure_future(client.call(server.address, "slow", timeout=20))
    await asyncio.sleep(0.2)
    start = time.monotonic()
    await server.close()
    with pytest.raises(PeerUnreachable):
        await call
    assert time.monotonic() - start < 2.0, "a disconnect must not wait for the call's timeout"
    with pytest.raises(PeerUnreachable):
        await client.call(server.address, "slow", timeout=5)


async def test_many_concurrent_calls_share_one_socket(make_endpoint):
    server, client = await make_endpoint(), await make_endpoint()

    async def delayed_echo(payload, ctx):
        await asyncio.sleep(0.01 * (payload % 5))
        return payload

    server.register("echo", delayed_echo)
    results = await asyncio.gather(*(client.call(server.address, "echo", i) for i in range(200)))
    assert results == list(range(200))  # each reply matched to its own request id
    assert client.stats["connections_opened"] == 1


async def test_outgoing_pool_is_bounded(make_endpoint):
    client = await make_endpoint(pool_size=3)
    servers = [await make_endpoint() for _ in range(8)]
    for server in servers:
        server.register("echo", echo)
    for server in servers:
        assert await client.call(server.address, "echo", 1) == 1
    assert len(client.pool) <= 3
    assert client.stats["connections_closed"] >= 5
    for server in servers:  # evicted peers are reconnected transparently
        assert await client.call(server.address, "echo", 2) == 2


async def test_close_leaves_no_tasks_or_sockets():
    before = {t for t in asyncio.all_tasks()}
    server, client = await Endpoint().start(), await Endpoint().start()
    server.register("echo", echo)
    for _ in range(3):
        await client.call(server.address, "echo", torch.randn(10))
    sockets = [server._router, *(c.socket for c in client.pool.connections.values()), *(c.monitor for c in client.pool.connections.values())]
    await client.close()
    await server.close()
    await asyncio.sleep(0)
    assert {t for t in asyncio.all_tasks()} - before == set()
    assert all(s.closed for s in sockets)
    with pytest.raises(RPCError):
        await client.call(server.address, "echo", 1)


async def test_large_tensor_is_streamed_and_exact(make_endpoint):
    server, client = await make_endpoint(inline_limit=1 << 20, chunk_size=1 << 20), await make_endpoint(
        inline_limit=1 << 20, chunk_size=1 << 20
    )
    server.register("echo", echo)
    big = torch.randn(3 << 20)  # 12 MiB -> 12 chunks each way
    small = torch.randn(10)
    reply = await client.call(server.address, "echo", {"big": big, "small": small, "v": big[::2]})
    assert torch.equal(reply["big"], big) and torch.equal(reply["small"], small) and torch.equal(reply["v"], big[::2])


def test_process_limits_are_raised():
    ctx = shared_context()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or soft >= 1 << 20
    assert ctx.get(zmq.MAX_SOCKETS) > 1023


RECEIVER = textwrap.dedent(
    """
    import asyncio, resource, sys
    import torch
    from hivesim.net import Endpoint

    async def main():
        done = asyncio.Event()
        endpoint = await Endpoint().start()
        result = {}
        async def take(payload, ctx):
            result["ok"] = bool(payload[-1] == 7.0 and payload[0] == 1.0)
            done.set()
            return payload.numel()
        endpoint.register("take", take)
        print(endpoint.address, flush=True)
        await asyncio.wait_for(done.wait(), 120)
        await asyncio.sleep(0.2)
        await endpoint.close()
        print(result["ok"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, flush=True)

    asyncio.run(main())
    """
)


async def test_one_gib_tensor_goes_through_without_doubling_memory_or_stalling_the_loop(make_endpoint):
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        address = await asyncio.wait_for(asyncio.to_thread(receiver.stdout.readline), 60)
        client = await make_endpoint()
        tensor = torch.ones(1 << 28)  # 1 GiB of float32
        tensor[-1] = 7.0
        gaps = []

        async def ticker():
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.ensure_future(ticker())
        numel = await client.call(address.strip(), "take", tensor, timeout=120)
        tick.cancel()
        assert numel == tensor.numel()
        ok, peak_mib = (await asyncio.to_thread(receiver.stdout.readline)).split()
        assert ok == "True"
        # the receiver holds the 1 GiB tensor once, plus interpreter + torch (~300 MiB) and a few chunks
        assert int(peak_mib) < 1024 + 700, f"receiver peaked at {peak_mib} MiB"
        assert max(gaps) < 0.5, f"the sender's event loop stalled for {max(gaps):.2f} s"
    finally:
        receiver.kill()
        receiver.wait()
    del tensor
    gc.collect()


async def test_declared_size_limit_is_enforced(make_endpoint):
    server, client = await make_endpoint(max_message_bytes=1 << 20), await make_endpoint()
    server.register("echo", echo)
    with pytest.raises(BadMessage, match="more than"):
        await client.call(server.address, "echo", torch.zeros(1 << 19))  # 2 MiB > 1 MiB
    assert await client.call(server.address, "echo", 3) == 3


async def test_request_is_call_as_a_future_with_the_same_errors(make_endpoint):
    server, client = await make_endpoint(), await make_endpoint()
    server.register("echo", lambda payload, ctx: payload)

    async def fail(payload, ctx):
        raise KeyError("nope")

    async def slow(payload, ctx):
        await asyncio.sleep(10)

    server.register("fail", fail)
    server.register("slow", slow)
    assert await client.request(server.address, "echo", {"a": [1, b"x"]}) == {"a": [1, b"x"]}  # connects (task)
    futures = [client.request(server.address, "echo", i) for i in range(50)]  # open connection: no tasks
    assert not any(isinstance(f, asyncio.Task) for f in futures)
    assert await asyncio.gather(*futures) == list(range(50))
    with pytest.raises(RemoteError) as info:
        await client.request(server.address, "fail")
    assert info.value.remote_type == "KeyError"
    start = time.monotonic()
    with pytest.raises(RPCTimeout):
        await client.request(server.address, "slow", timeout=0.3)
    assert 0.25 < time.monotonic() - start < 2.0
    abandoned = client.request(server.address, "slow", timeout=5)
    abandoned.cancel()
    await asyncio.sleep(0.05)
    assert not client._pending and all(not c.calls for c in client.pool.connections.values())  # nothing left behind
    reply = await client.request(server.address, "echo", torch.arange(4.0))  # tensors go through too
    assert torch.equal(reply, torch.arange(4.0))
    with pytest.raises(PeerUnreachable):
        await client.request(DEAD_ADDRESS, "echo", timeout=5)
