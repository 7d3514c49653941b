"""Attacks on the transport, performed on loopback: each test runs the attack and asserts the honest side's outcome.

The attacker is a relay on the path, a peer holding another key than the address names, or a peer that
speaks the wire protocol by hand (``raw_client``) and lies in it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
import torch

from hivesim.net import Endpoint, Identity, PeerUnreachable, RemoteError, RPCError
from hivesim.net.rpc import CHUNK, ERROR, REQUEST
from hivesim.net.secure import CurveKeys, curve_public_key, format_address, split_address
from tests.conftest import DEAD_ADDRESS, raw_client

MARKER = b"hivesim-plaintext-marker-"


class Relay:
    """A TCP relay between a caller and ``target`` that records every byte and may flip one on the way back."""

    def __init__(self, target: str, tamper_after: int | None = None) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.tamper_after = tamper_after  # flip a byte of server->caller traffic once this many passed
        self.seen = bytearray()
        self.back = 0
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for task in (self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True)):
            t = asyncio.get_running_loop().create_task(task)
            self.tasks.add(t)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, back: bool) -> None:
        try:
            while data := await reader.read(65536):
                self.seen += data
                if back and self.tamper_after is not None:
                    data = bytearray(data)
                    i = self.tamper_after - self.back
                    if 0 <= i < len(data):
                        data[i] ^= 0x40
                    self.back += len(data)
                writer.write(bytes(data))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _via(relay_base: str, server: Endpoint) -> str:
    """The server's address with the relay's host and port: what a caller misdirected to the relay dials."""
    return format_address(relay_base, split_address(server.address)[1])


@pytest.mark.parametrize("encryption", [True, False])
async def test_a_relay_reads_nothing_when_encrypted(make_endpoint, encryption):
    server = await make_endpoint(encryption=encryption)
    client = await make_endpoint(encryption=encryption)
    server.register("echo", lambda payload, ctx: payload)
    relay = Relay(split_address(server.address)[0])
    base = await relay.start()
    try:
        payload = {"text": MARKER * 100, "t": torch.arange(1000)}
        out = await client.call(_via(base, server) if encryption else base, "echo", payload, timeout=5)
        assert out["text"] == payload["text"] and torch.equal(out["t"], payload["t"])
        # the control (no encryption) shows the relay would see the marker; encrypted, it sees only ciphertext
        assert (MARKER in relay.seen) is (not encryption)
    finally:
        await relay.close()


async def test_a_tampered_reply_raises_and_is_never_returned(make_endpoint):
    server = await make_endpoint()
    client = await make_endpoint()
    server.register("echo", lambda payload, ctx: payload)
    relay = Relay(split_address(server.address)[0], tamper_after=20_000)  # past the handshake, inside the reply
    base = await relay.start()
    try:
        payload = torch.ones(1 << 16, dtype=torch.float32)
        with pytest.raises(RPCError):  # the MAC fails, the connection drops: PeerUnreachable or a timeout
            await client.call(_via(base, server), "echo", payload, timeout=3)
        assert relay.back > 20_000  # the flip did happen inside the reply
        other = await make_endpoint()  # the server keeps serving honest callers
        assert torch.equal(await other.call(server.address, "echo", payload, timeout=5), payload)
    finally:
        await relay.close()


async def test_an_impostor_cannot_answer_for_another_peer(make_endpoint):
    honest = await make_endpoint()
    impostor = await make_endpoint()
    client = await make_endpoint()
    impostor.register("whoami", lambda payload, ctx: "impostor")
    # the impostor's host and port, the honest peer's key: the handshake fails, fast and typed
    forged = format_address(split_address(impostor.address)[0], split_address(honest.address)[1])
    started = time.monotonic()
    with pytest.raises(PeerUnreachable, match="does not hold the key"):
        await client.call(forged, "whoami", timeout=5)
    assert time.monotonic() - started < 3.0
    assert client.stats["handshakes_failed"] >= 1


async def test_handlers_see_the_proven_caller(make_endpoint):
    server = await make_endpoint()
    alice = Identity()
    client = await make_endpoint(identity=alice)
    server.register("who", lambda payload, ctx: ctx.peer_id)
    assert await client.call(server.address, "who") == alice.peer_id
    # the id is a hash of the Curve key the connection proved, and it is what the Ed25519 key derives
    assert alice.peer_id == Endpoint(identity=alice).peer_id
    assert CurveKeys.from_identity(alice).public == curve_public_key(alice.public_key)


async def test_an_encrypted_endpoint_refuses_keyless_addresses(make_endpoint):
    client = await make_endpoint()
    plain = await make_endpoint(encryption=False)
    plain.register("echo", lambda payload, ctx: payload)
    with pytest.raises(PeerUnreachable, match="names no peer key"):
        await client.call(plain.address, "echo", 1, timeout=2)


async def test_a_stream_reservation_does_not_starve_honest_messages(make_endpoint):
    server = await make_endpoint(max_message_bytes=64 << 20, max_pending_bytes=64 << 20, stream_idle_timeout=0.5)
    server.register("echo", lambda payload, ctx: payload.sum().item())
    attacker = raw_client(server.address)
    try:
        for rid in (1, 2):  # two 100-byte headers declaring 60 MiB streams, with an absurd timeout
            header = {"v": 1, "k": REQUEST, "i": rid, "m": "echo", "to": 1e9, "b": msgpack.packb(None),
                      "L": [60 << 20], "S": [0]}
            await attacker.send_multipart([msgpack.packb(header)])
        header = msgpack.unpackb((await asyncio.wait_for(attacker.recv_multipart(), 3))[0])
        assert header["k"] == ERROR and header["i"] == 2 and "too many streamed bytes" in header["e"][1]
        async with Endpoint() as honest:  # an honest 8 MiB message (streamed) goes through meanwhile
            assert await honest.call(server.address, "echo", torch.ones(2 << 20), timeout=10) == 2 << 20
        # the reservation is gone once the stream stalls, however long its header asked to be held
        for _ in range(40):
            if not server.streams.incoming:
                break
            await asyncio.sleep(0.1)
        assert not server.streams.incoming and server.streams.pending_bytes == 0
        assert server.stats["expired_streams"] == 1
    finally:
        attacker.close(0)


async def test_sparse_chunks_cannot_amplify_memory(make_endpoint):
    server = await make_endpoint(max_message_bytes=512 << 20)
    server.register("echo", lambda payload, ctx: 0)
    attacker = raw_client(server.address)
    try:
        header = {"v": 1, "k": REQUEST, "i": 7, "m": "echo", "to": 30, "b": msgpack.packb(None),
                  "L": [512 << 20], "S": [0]}
        await attacker.send_multipart([msgpack.packb(header)])
        sent = 0
        for n in range(64):  # 1-byte chunks 4 KiB apart: each would touch a fresh page
            chunk = {"v": 1, "k": CHUNK, "i": 7, "x": 0, "o": n * 4096}
            await attacker.send_multipart([msgpack.packb(chunk), b"x"])
            sent += 1
        reply = msgpack.unpackb((await asyncio.wait_for(attacker.recv_multipart(), 3))[0])
        assert reply["k"] == ERROR and "in order" in reply["e"][1]
        await asyncio.sleep(0.2)
        # held bytes stay within twice what was received (here: the stream was dropped at the first gap)
        assert server.streams.received_bytes <= 2 * sent
        assert not server.streams.incoming
    finally:
        attacker.close(0)


async def test_a_caller_that_never_reads_cannot_starve_others(make_endpoint):
    server = await make_endpoint(max_inflight_per_peer=32, reply_stall_timeout=3.0)
    blob = torch.zeros(1 << 16, dtype=torch.uint8)  # 64 KiB replies: the unread queue fills fast
    server.register("blob", lambda payload, ctx: blob)
    server.register("echo", lambda payload, ctx: payload)
    attacker = raw_client(server.address)
    try:
        for rid in range(3000):  # ~190 KiB of requests; the attacker never reads a reply
            request = {"v": 1, "k": REQUEST, "i": rid, "m": "blob", "to": 600, "b": msgpack.packb(None), "L": []}
            await attacker.send_multipart([msgpack.packb(request)])
        for _ in range(100):  # the attack has reached the server (the raw socket connects lazily)
            if server.stats["overloaded"] + server.stats["calls_served"] >= 1000:
                break
            await asyncio.sleep(0.1)
        async with Endpoint() as honest:  # meanwhile, an honest caller is served as usual
            for i in range(20):
                assert await honest.call(server.address, "echo", i, timeout=10) == i
        assert server.stats["overloaded"] > 0  # the attacker did reach its own limit...
        assert max(server._busy.values(), default=0) <= 32  # ...which is all it holds
        for _ in range(100):  # undeliverable replies are dropped after the stall timeout
            if not server._busy:
                break
            await asyncio.sleep(0.1)
        assert not server._busy and len(server._serving) == 0
    finally:
        attacker.close(0)


async def test_a_header_declaring_a_million_buffers_is_refused_quickly(make_endpoint):
    server = await make_endpoint()
    server.register("echo", lambda payload, ctx: payload)
    attacker = raw_client(server.address)
    try:
        n = 1_000_000  # zero-length and "streamed": no frame needs to follow, 5.9 MB of header in all
        header = {"v": 1, "k": REQUEST, "i": 3, "m": "echo", "to": 5, "b": msgpack.packb(None), "L": [0] * n,
                  "S": list(range(n))}
        started = time.monotonic()
        await attacker.send_multipart([msgpack.packb(header)])
        reply = msgpack.unpackb((await asyncio.wait_for(attacker.recv_multipart(), 5))[0])
        assert reply["k"] == ERROR and "buffers" in reply["e"][1]
        assert time.monotonic() - started < 2.0
        async with Endpoint() as honest:
            assert await honest.call(server.address, "echo", 5) == 5
    finally:
        attacker.close(0)


def test_out_of_sockets_gives_a_typed_error():
    """At the process's socket limit, a call fails with PeerUnreachable (not a raw ZMQError) and the endpoint
    keeps serving (run in a subprocess: the limit is per process)."""
    script = textwrap.dedent("""
        import asyncio, zmq
        from hivesim.net.limits import shared_context
        from hivesim.net import Endpoint, PeerUnreachable
        shared_context().set(zmq.MAX_SOCKETS, 24)
        async def main():
            servers = []
            for _ in range(4):
                s = await Endpoint().start(); s.register("ping", lambda p, c: "pong"); servers.append(s)
            client = await Endpoint(pool_size=1000).start()
            typed, raw = 0, 0
            for i in range(40):
                target = servers[i % 4] if i < 4 else await Endpoint().start()
                try:
                    target.register("ping", lambda p, c: "pong")
                except Exception:
                    pass
                try:
                    await client.call(target.address, "ping", timeout=2)
                except PeerUnreachable as e:
                    typed += "out of sockets" in str(e)
                    break
                except zmq.ZMQError:
                    raw += 1
                    break
            print("typed", typed, "raw", raw)
            print("still", await client.call(servers[0].address, "ping", timeout=2))
        try:
            asyncio.run(main())
        except zmq.ZMQError as e:
            print("raw-outside", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "typed 1 raw 0" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "still pong" in out.stdout, out.stdout + out.stderr[-2000:]


async def test_abandoned_requests_leave_no_unretrieved_exceptions(make_endpoint, caplog):
    client = await make_endpoint()
    caplog.set_level(logging.ERROR, logger="asyncio")
    for _ in range(20):  # a lookup that gave up on these (churn) never awaits them
        client.request(DEAD_ADDRESS, "find", {}, timeout=0.3)
    await asyncio.sleep(1.5)
    gc.collect()
    await asyncio.sleep(0.1)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_remote_errors_still_typed_under_encryption(make_endpoint):
    server = await make_endpoint()
    client = await make_endpoint()
    server.register("boom", lambda payload, ctx: {}["missing"])
    with pytest.raises(RemoteError) as info:
        await client.call(server.address, "boom")
    assert info.value.remote_type == "KeyError"


async def test_a_peer_without_encryption_has_a_keyless_address():
    from hivesim.peer import Peer

    peer = Peer("plain", [], endpoint={"encryption": False})
    await peer.start([])
    try:
        assert split_address(peer.endpoint.address)[1] is None and not peer.endpoint.encryption
    finally:
        await peer.stop()
