"""Hostile or broken traffic from a raw ZeroMQ socket: the endpoint answers or drops, and keeps serving."""

import asyncio

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio

from hivesim.net.rpc import CHUNK, ERROR, REQUEST
from tests.conftest import raw_client


@pytest.fixture
async def raw_peer(make_endpoint):
    server = await make_endpoint(max_message_bytes=64 << 20)
    server.register("echo", lambda payload, ctx: payload)
    sock = raw_client(server.address)

    async def send(*frames):
        await sock.send_multipart(list(frames))

    async def reply(timeout=2.0):
        frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
        return msgpack.unpackb(frames[0], raw=False), frames[1:]

    yield server, send, reply
    sock.close(0)


def req(rid, method="echo", **extra):
    header = {"v": 1, "k": REQUEST, "i": rid, "m": method, "to": 5.0, "b": msgpack.packb(None), "L": []}
    header.update(extra)
    return msgpack.packb(header)


async def still_serves(server):
    from hivesim.net import Endpoint

    async with Endpoint() as client:
        out = await client.call(server.address, "echo", {"t": torch.arange(4)})
        assert torch.equal(out["t"], torch.arange(4))
    assert server.streams.pending_bytes == 0 and not server.streams.incoming


async def test_garbage_is_dropped_and_counted(raw_peer):
    server, send, reply = raw_peer
    await send(b"\xc1\xff garbage")
    await send(msgpack.packb([1, 2, 3]))  # valid msgpack, not a header
    await send(msgpack.packb({"k": 0, "i": "not-an-int"}))
    await asyncio.sleep(0.2)
    assert server.stats["dropped_malformed"] == 3
    await still_serves(server)


async def test_unknown_method_gets_an_error(raw_peer):
    server, send, reply = raw_peer
    await send(req(1, method="launch_missiles"))
    header, _ = await reply()
    assert header["k"] == ERROR and header["i"] == 1 and header["e"][0] == "UnknownMethod"
    await still_serves(server)


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([req(2, L=[100])], "inline buffers"),  # truncated: the declared frame is missing
        ([req(3, L=[100]), b"x" * 50], "declares 100 bytes"),  # frame shorter than declared
        ([req(4, L=[10**15], S=[0])], "more than"),  # huge declared length: refused before allocating
        ([req(5, L=[-1])], "non-negative"),
        ([req(6, L=[4], S=[3])], "out of range"),
        ([req(7, b=b"\xc1\xc1")], "malformed message body"),
        ([req(8, b=msgpack.packb(msgpack.ExtType(1, msgpack.packb([0, "float32", [2**40], "none", {}]))), L=[8]), b"x" * 8], "needs"),
        ([req(9, b=12345)], "must be bytes"),
    ],
)
async def test_lying_messages_get_bad_message_errors(raw_peer, frames, reason):
    server, send, reply = raw_peer
    await send(*frames)
    header, _ = await reply()
    assert header["k"] == ERROR and header["e"][0] == "BadMessage", header
    assert reason in header["e"][1]
    await still_serves(server)


async def test_unfinished_streams_expire_and_stray_chunks_are_dropped(raw_peer):
    server, send, reply = raw_peer
    await send(req(10, L=[32 << 20], S=[0], to=0.5))  # declares a stream, never sends it
    await asyncio.sleep(0.1)
    assert server.streams.pending_bytes == 32 << 20
    await send(msgpack.packb({"v": 1, "k": CHUNK, "i": 10, "x": 0, "o": (32 << 20) - 4}), b"x" * 100)  # overflows
    header, _ = await reply()
    assert header["e"][0] == "BadMessage" and "in order" in header["e"][1]
    assert server.streams.pending_bytes == 0  # the broken stream was let go
    await send(req(11, L=[1 << 20], S=[0], to=0.5))
    await asyncio.sleep(1.3)
    assert server.stats["expired_streams"] == 1 and server.streams.pending_bytes == 0
    await send(msgpack.packb({"v": 1, "k": CHUNK, "i": 999, "x": 0, "o": 0}), b"x")
    await asyncio.sleep(0.1)
    assert server.stats["dropped_stray_chunks"] == 1
    await still_serves(server)


async def test_flood_of_requests_is_bounded(make_endpoint):
    server = await make_endpoint(max_inflight=50)
    hold = asyncio.Event()

    async def stuck(payload, ctx):
        await hold.wait()
        return 1

    server.register("stuck", stuck)
    server.register("echo", lambda payload, ctx: payload)
    sock = raw_client(server.address)
    try:
        for rid in range(300):
            await sock.send_multipart([req(rid, method="stuck")])
        overloaded = 0
        for _ in range(300 - 50):
            header = msgpack.unpackb((await asyncio.wait_for(sock.recv_multipart(), 5))[0])
            overloaded += header["e"][0] == "Overloaded"
        assert overloaded == 300 - 50
        assert len(server._serving) <= 50
        hold.set()
        await still_serves(server)
    finally:
        sock.close(0)
