"""Async RPC over ZeroMQ: one ROUTER to serve, a bounded pool of DEALERs to call out.

Every peer owns one :class:`Endpoint`. It binds a ROUTER socket that serves the handlers registered by
name, and it calls other peers through DEALER sockets kept per destination in a small LRU pool, so a
process packing hundreds of peers does not hold a socket for every neighbour it ever talked to.

A message is a msgpack header frame plus raw buffer frames (see :mod:`hivesim.net.serialization`).
Buffers above ``inline_limit`` bytes are *streamed*: the header only declares their sizes, and the bytes
follow as chunk messages that the receiver copies straight into a preallocated tensor, so a 1 GiB
tensor needs neither 2x memory nor a long stall of the event loop. Many calls share one socket, told
apart by request ids. Replies and failures come back typed (:mod:`hivesim.net.errors`).

Nothing a remote peer sends can crash the endpoint: malformed frames are answered with a
``BadMessage`` error when they carry a request id, dropped and counted in :attr:`Endpoint.stats`
otherwise, and declared sizes are checked against ``max_message_bytes`` before anything is allocated.
What one caller may hold is budgeted per caller: running calls (``max_inflight_per_peer``), streamed bytes
(:mod:`hivesim.net.streams`), and replies it does not read (dropped after ``reply_stall_timeout``).

The concerns live in small modules: :mod:`~hivesim.net.socket_io` drives a socket from the event loop,
:mod:`~hivesim.net.connections` pools outgoing connections, :mod:`~hivesim.net.streams` reassembles
streamed messages, and :mod:`~hivesim.net.secure` makes every connection authenticated and encrypted
(CurveZMQ keys derived from the peer's Ed25519 identity, on by default).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from hivesim.net.connections import Connection, ConnectionPool
from hivesim.net.errors import BadMessage, PeerUnreachable, RemoteError, RPCError, RPCTimeout
from hivesim.net.identity import Identity
from hivesim.net.limits import shared_context
from hivesim.net.links import IdentityLinks, LinkModel
from hivesim.net.secure import CurveKeys, ensure_authenticator, format_address, secure_server
from hivesim.net.serialization import Packed, pack, unpack
from hivesim.net.socket_io import MiB, SocketIO, frame, tune
from hivesim.net.streams import Incoming, StreamReassembly

logger = logging.getLogger(__name__)

REQUEST, REPLY, ERROR, CHUNK = 0, 1, 2, 3
PROTOCOL = 1
_NO_PEER = b""  # the budget key of a caller whose identity is not proven (an unencrypted endpoint)


Handler = Callable[[Any, "CallContext"], Awaitable[Any] | Any]
Admit = Callable[[dict, "bytes | None"], None]


@dataclass
class CallContext:
    """What a handler knows about the call it serves."""

    method: str
    deadline: float  # time.monotonic() after which the caller stops waiting
    src: str = ""  # the caller's link tag in a simulation, "" in deployment
    # the caller's peer id as its encrypted connection proved it; None on an endpoint without encryption,
    # where nothing about the caller is proven
    peer_id: bytes | None = None

    @property
    def time_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class Lateness:
    """Running summary of how late (seconds) the link shaper released held messages."""

    __slots__ = ("count", "total", "worst", "over_1ms")

    def __init__(self) -> None:
        self.count, self.total, self.worst, self.over_1ms = 0, 0.0, 0.0, 0

    def add(self, late: float) -> None:
        self.count += 1
        self.total += late
        self.worst = max(self.worst, late)
        self.over_1ms += late > 0.001

    def summary(self) -> dict[str, float]:
        return {
            "messages": self.count,
            "mean_ms": 1e3 * self.total / self.count if self.count else 0.0,
            "max_ms": 1e3 * self.worst,
            "late_over_1ms": self.over_1ms,
        }


class Endpoint:
    """A peer's network presence: serves registered handlers and calls other endpoints.

    Args:
        host: interface to bind (``"0.0.0.0"`` on a real cluster).
        port: TCP port, 0 picks a free one; :attr:`address` tells which.
        links: the link model (``IdentityLinks`` in deployment, ``ShapedLinks`` in simulation).
        advertise_host: host written into :attr:`address` when ``host`` is a wildcard.
        identity: the peer's Ed25519 key pair; its Curve keys and peer id derive from it (fresh if omitted).
        encryption: CurveZMQ on the serving socket (see :mod:`hivesim.net.secure`): callers are
            authenticated (``CallContext.peer_id``) and traffic is encrypted; the address then names the
            peer's key, and this endpoint only calls addresses that name one. Off: plain ZeroMQ, nothing
            about a caller is proven (simulations that want raw speed).
        default_timeout: seconds a :meth:`call` waits when it is given no timeout.
        connect_timeout: seconds to wait for a TCP + ZMTP (+ Curve) handshake with a new peer.
        max_call_timeout: the longest a served call or a stream may take, whatever the caller asks.
        max_message_bytes: largest message (all buffers together) accepted from a peer.
        max_buffers: most buffers one message may declare.
        max_pending_bytes: most bytes received into incomplete streamed messages, all peers together.
        max_pending_bytes_per_peer: most declared-but-missing streamed bytes one peer may have
            outstanding (default: ``max_message_bytes``, one whole message).
        stream_idle_timeout: a stream that receives nothing for this long is dropped.
        max_inflight: most handler calls running at once; more get an ``Overloaded`` error.
        max_inflight_per_peer: most handler calls (and undelivered replies) of one peer.
        reply_stall_timeout: a reply the caller's socket does not take for this long is dropped.
        pool_size: outgoing connections kept open; idle ones beyond it are closed, oldest first.
        inline_limit: buffers larger than this are streamed in chunks of ``chunk_size``.
        compression: default compression of outgoing tensors (see :mod:`hivesim.net.codecs`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        links: LinkModel | None = None,
        advertise_host: str | None = None,
        identity: Identity | None = None,
        encryption: bool = True,
        default_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_call_timeout: float = 24 * 3600.0,
        max_message_bytes: int = 16 << 30,
        max_buffers: int = 8192,
        max_pending_bytes: int = 32 << 30,
        max_pending_bytes_per_peer: int | None = None,
        stream_idle_timeout: float = 60.0,
        max_inflight: int = 1024,
        max_inflight_per_peer: int = 256,
        reply_stall_timeout: float = 10.0,
        pool_size: int = 64,
        inline_limit: int = 4 * MiB,
        chunk_size: int = 4 * MiB,
        compression: Any = None,
    ) -> None:
        self.host = host
        self.port = port
        self.links: LinkModel = links if links is not None else IdentityLinks()
        self.advertise_host = advertise_host
        self.identity = identity if identity is not None else Identity()
        self.encryption = bool(encryption)
        self.keys = CurveKeys.from_identity(self.identity)
        self.default_timeout = default_timeout
        self.connect_timeout = connect_timeout
        self.max_call_timeout = max_call_timeout
        self.max_message_bytes = max_message_bytes
        self.max_inflight = max_inflight
        self.max_inflight_per_peer = max_inflight_per_peer
        self.reply_stall_timeout = reply_stall_timeout
        self.pool_size = pool_size
        self.inline_limit = inline_limit
        self.chunk_size = chunk_size
        self.compression = compression
        self.stats: Counter[str] = Counter()
        self.lateness = Lateness()  # how late shaped messages were released: the emulation's error
        self.streams = StreamReassembly(
            max_message_bytes=max_message_bytes, max_buffers=max_buffers, max_pending_bytes=max_pending_bytes,
            max_pending_bytes_per_peer=max_message_bytes if max_pending_bytes_per_peer is None
            else max_pending_bytes_per_peer,
            idle_timeout=stream_idle_timeout, max_timeout=max_call_timeout, default_timeout=default_timeout,
            stats=self.stats,
        )
        self.pool = ConnectionPool(keys=self.keys, require_key=self.encryption, connect_timeout=connect_timeout,
                                   size=pool_size, on_reply=self._on_reply, on_lost=self._on_lost, stats=self.stats)

        self._handlers: dict[str, Handler] = {}
        self._admit: dict[str, Admit] = {}  # per method: checks a request's header before its bytes arrive
        self._router: zmq.Socket | None = None
        self._router_io: SocketIO | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._into: dict[int, Callable[[int, int], Any]] = {}  # where a call's streamed reply buffers land
        self._serving: set[asyncio.Task] = set()  # handler tasks and reply sends, cancelled at close
        self._busy: Counter = Counter()  # per peer: its running handler tasks and undelivered replies
        self._handlers_running = 0
        self._peer_of: dict[bytes, bytes] = {}  # ROUTER routing id -> the peer id its connection proved
        self._rids = itertools.count(1)
        self._closed = False
        self._address = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> "Endpoint":
        """Bind the ROUTER socket and start serving. Returns ``self``."""
        if self._router is not None:
            return self
        ctx = shared_context()
        router = zmq.Socket(ctx, zmq.ROUTER)  # a plain socket: SocketIO drives it
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        tune(router)
        if self.encryption:
            ensure_authenticator(ctx)
            secure_server(router, self.keys)
        if ":" in self.host:
            router.setsockopt(zmq.IPV6, 1)
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            if self.port:
                router.bind(f"tcp://{host}:{self.port}")
            else:
                self.port = router.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as e:
            router.close(0)
            raise OSError(f"cannot bind tcp://{host}:{self.port}: {e}") from None
        self._router = router
        shown = self.advertise_host or self.host
        if shown in ("0.0.0.0", "*", "::"):
            shown = "127.0.0.1"
        shown = f"[{shown}]" if ":" in shown else shown
        self._address = format_address(f"tcp://{shown}:{self.port}", self.keys.public if self.encryption else None)
        self._router_io = SocketIO(router, asyncio.get_running_loop(), self._on_routed)
        return self

    async def __aenter__(self) -> "Endpoint":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> str:
        """The address other peers call, e.g. ``tcp://127.0.0.1:40123/<key>`` (no key without encryption)."""
        if not self._address:
            raise RuntimeError("the endpoint is not started: await endpoint.start() first")
        return self._address

    @property
    def peer_id(self) -> bytes:
        """This peer's id: what callers see as ``CallContext.peer_id`` (a hash of its Curve key)."""
        return self.identity.peer_id

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Stop serving, close every socket and cancel every task. Pending calls fail."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._serving)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RPCError("the endpoint was closed"))
                fut.exception()  # its caller may be gone too: do not warn about it
        self._pending.clear()
        self.streams.clear()
        self.pool.close()
        if self._router_io is not None:
            self._router_io.close()
        if self._router is not None:
            self._router.close(0)

    # ------------------------------------------------------------------ serving

    def register(self, name: str, handler: Handler, *, replace: bool = False, admit: Admit | None = None) -> None:
        """Serve ``handler(payload, ctx)`` (sync or async) under ``name``; its return value is the reply.

        ``admit(header, peer_id)``, if given, sees every request to ``name`` when its header arrives, before
        any of its streamed bytes are received or allocated, and refuses it by raising ``BadMessage`` (the
        caller gets that error at once; the request's chunks are then dropped as strays). ``header["L"]``
        lists the buffer sizes and ``header["b"]`` is the msgpack body, whose tensors are descriptors only.
        """
        if name in self._handlers and not replace:
            raise ValueError(f"a handler named {name!r} is already registered")
        self._handlers[name] = handler
        if admit is not None:
            self._admit[name] = admit
        else:
            self._admit.pop(name, None)

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)
        self._admit.pop(name, None)

    def _on_routed(self, frames: list) -> None:
        """A message on the ROUTER: the sender's routing id, then the message."""
        if len(frames) < 2:
            self.stats["dropped_malformed"] += 1
            return
        origin = frames[0].bytes
        peer = _NO_PEER
        if self.encryption:
            peer = self._peer_of.get(origin)
            if peer is None:
                try:
                    peer = bytes.fromhex(frames[1].get("User-Id"))
                except (zmq.ZMQError, ValueError, TypeError):
                    self.stats["dropped_unauthenticated"] += 1
                    return
                if len(self._peer_of) >= 65536:  # routing ids are per connection: forget old ones wholesale
                    self._peer_of.clear()
                self._peer_of[origin] = peer
        self._on_frames(origin, peer, frames[1:])

    def _on_reply(self, frames: list) -> None:
        """A message on one of our DEALERs: a reply (or a chunk of one) to a call of ours."""
        self._on_frames(b"", None, frames)

    def _serve(self, origin: bytes, incoming: Incoming) -> None:
        """Serve one request. A sync handler runs right here, in the reader's callback, and its reply is
        sent before the next message is read; an async handler (or a reply that must wait for the
        socket) gets a task."""
        header = incoming.header
        rid, method, peer = header["i"], header.get("m"), incoming.peer
        try:
            if not isinstance(method, str):
                raise BadMessage("a request needs a method name")
            handler = self._handlers.get(method)
            if handler is None:
                self._reply_error(origin, rid, "UnknownMethod", f"no handler named {method!r}")
                return
            if self._handlers_running >= self.max_inflight or self._busy[peer] >= self.max_inflight_per_peer:
                self.stats["overloaded"] += 1
                mine = self._busy[peer] >= self.max_inflight_per_peer
                self._reply_error(origin, rid, "Overloaded", f"more than {self.max_inflight_per_peer} calls of yours "
                                  "running" if mine else f"more than {self.max_inflight} calls running")
                return
            timeout = header.get("to")
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
                timeout = self.default_timeout
            deadline = time.monotonic() + min(float(timeout), self.max_call_timeout)
            payload = unpack(header.get("b", b""), incoming.buffers)
            src = header.get("src", "")
            ctx = CallContext(method, deadline, src if isinstance(src, str) else "", peer if self.encryption else None)
            try:
                result = handler(payload, ctx)
            except BadMessage:
                raise
            except Exception as e:
                self._handler_failed(origin, rid, method, e)
                return
            if inspect.isawaitable(result):
                self._handlers_running += 1
                task = self._track(peer, self._finish(origin, peer, rid, method, result, ctx))
                if inspect.iscoroutine(result):  # a task cancelled before its first step (the endpoint
                    task.add_done_callback(lambda _: result.close())  # closed) never starts the handler
                return
            pending = self._reply(origin, rid, result, deadline)
            if pending is not None:
                self._track(peer, self._wait_reply(pending))
        except BadMessage as e:
            self.stats["bad_messages"] += 1
            self._reply_error(origin, rid, "BadMessage", str(e))

    def _track(self, peer: Any, coro: Any) -> asyncio.Task:
        """Run ``coro`` as a task charged to ``peer`` until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._serving.add(task)
        self._busy[peer] += 1

        def done(t: asyncio.Task) -> None:
            self._serving.discard(t)
            self._busy[peer] -= 1
            if self._busy[peer] <= 0:
                del self._busy[peer]

        task.add_done_callback(done)
        return task

    async def _finish(self, origin: bytes, peer: Any, rid: int, method: str, result: Awaitable,
                      ctx: CallContext) -> None:
        """Await an async handler within the call's deadline (plus a second of grace), then reply."""
        try:
            try:
                async with asyncio.timeout(ctx.time_left + 1.0):
                    value = await result
            finally:
                self._handlers_running -= 1
        except asyncio.TimeoutError:
            self.stats["handler_timeouts"] += 1
            return  # the caller has given up; nobody reads a reply
        except BadMessage as e:
            self.stats["bad_messages"] += 1
            self._reply_error(origin, rid, "BadMessage", str(e))
            return
        except Exception as e:
            self._handler_failed(origin, rid, method, e)
            return
        pending = self._reply(origin, rid, value, ctx.deadline)
        if pending is not None:
            await self._wait_reply(pending)

    def _handler_failed(self, origin: bytes, rid: int, method: str, error: Exception) -> None:
        self.stats["handler_errors"] += 1
        logger.debug("handler %s raised", method, exc_info=error)
        self._reply_error(origin, rid, type(error).__name__, str(error))

    def _reply(self, origin: bytes, rid: int, result: Any, deadline: float) -> Awaitable | None:
        """Send a handler's reply now if the socket takes it; else return what to await to finish."""
        try:
            packed = pack(result, self.compression)
        except Exception as e:
            self._reply_error(origin, rid, type(e).__name__, f"cannot send the reply: {e}")
            return None
        self.stats["calls_served"] += 1
        try:
            pending = self._send(self._router_io, [origin], {"k": REPLY, "i": rid}, packed, deadline,  # type: ignore[arg-type]
                                 stall=self.reply_stall_timeout)
        except (zmq.ZMQError, RPCError):
            self.stats["reply_failed"] += 1  # the caller went away
            return None
        return pending

    async def _wait_reply(self, pending: Awaitable) -> None:
        """Finish sending a reply; a caller that does not take it within the stall timeout loses it."""
        try:
            await pending
        except (zmq.ZMQError, RPCError):
            self.stats["reply_failed"] += 1

    def _reply_error(self, origin: bytes, rid: int, kind: str, message: str) -> None:
        header = {"v": PROTOCOL, "k": ERROR, "i": rid, "e": [kind, message[:2000]]}
        try:
            if not self._router_io.try_send([origin, msgpack.packb(header)]):  # type: ignore[union-attr]
                self.stats["reply_failed"] += 1  # the caller's queue is full: it is not reading
        except zmq.ZMQError:
            self.stats["reply_failed"] += 1

    # ------------------------------------------------------------------ calling

    async def call(
        self,
        address: str,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        compression: Any = None,
        into: Callable[[int, int], Any] | None = None,
    ) -> Any:
        """Call ``method`` on the endpoint at ``address`` and return its reply.

        ``into(index, nbytes)`` may name where a streamed reply buffer lands: a writable contiguous uint8
        tensor of exactly ``nbytes`` (or None for a fresh one). Receiving into memory the caller already
        has saves a fresh allocation, whose first touch (page faults) costs more than the copy itself.
        If the call fails, that memory may hold part of the reply.

        Raises:
            RPCTimeout: no reply within ``timeout`` seconds (default :attr:`default_timeout`).
            PeerUnreachable: the peer cannot be connected to, went away, or is not the peer the address
                names (a failed Curve handshake); also when this process is out of sockets.
            RemoteError: the remote handler raised (type and message are kept).
            BadMessage: either side could not decode the other's message.
        """
        if self._closed:
            raise RPCError("the endpoint is closed")
        timeout = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        packed = pack(payload, compression if compression is not None else self.compression)
        rid = next(self._rids)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        if into is not None:
            self._into[rid] = into
        conn: Connection | None = self.pool.get(address)
        try:
            if conn is None:
                conn = await self.pool.connect(address, deadline)
            conn.calls.add(rid)
            header = {"k": REQUEST, "i": rid, "m": method, "to": round(timeout, 3)}
            pending = self._send(conn.io, [], header, packed, deadline)  # type: ignore[arg-type]
            if pending is not None:
                await pending
            self.stats["calls_sent"] += 1
            timer = asyncio.get_running_loop().call_at(_loop_time(deadline), _expire, future)
            try:
                incoming: Incoming = await future
            finally:
                timer.cancel()
        except asyncio.TimeoutError:
            self.stats["call_timeouts"] += 1
            raise RPCTimeout(f"{method!r} on {address} got no reply within {timeout:.3g} s") from None
        finally:
            self._pending.pop(rid, None)
            self._into.pop(rid, None)
            self.streams.forget((b"", rid))
            if conn is not None:
                conn.calls.discard(rid)
                conn.last_used = time.monotonic()
        return _decode_reply(address, method, incoming)

    def request(
        self,
        address: str,
        method: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        compression: Any = None,
    ) -> asyncio.Future:
        """:meth:`call` as a future: the reply, or the same typed errors, without a coroutine.

        Over an open, unshaped connection with room to send, the request leaves at once and no task is
        made (what a DHT lookup's many small requests need); otherwise it falls back to a task running
        :meth:`call`. Cancelling the future abandons the call; a future nobody awaits any more does not
        warn about its exception.
        """
        loop = asyncio.get_running_loop()
        conn = self.pool.get(address)
        if conn is None or self._closed or self.links.shaped:
            return _quiet(loop.create_task(self.call(address, method, payload, timeout=timeout,
                                                     compression=compression)))
        result: asyncio.Future = loop.create_future()
        _quiet(result)
        timeout = self.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        try:
            packed = pack(payload, compression if compression is not None else self.compression)
        except Exception as e:  # unsendable payload: the same error call() raises
            result.set_exception(e)
            return result
        rid = next(self._rids)
        header = {"k": REQUEST, "i": rid, "m": method, "to": round(timeout, 3)}
        try:
            pending = self._send(conn.io, [], header, packed, deadline)  # type: ignore[arg-type]
        except RPCError as e:
            result.set_exception(e)
            return result
        if pending is not None:  # tensors to stream, or a full queue: not the fast path after all
            pending.close()  # type: ignore[attr-defined]
            return _quiet(loop.create_task(self.call(address, method, payload, timeout=timeout,
                                                     compression=compression)))
        self.stats["calls_sent"] += 1
        future: asyncio.Future = loop.create_future()
        self._pending[rid] = future
        conn.calls.add(rid)
        timer = loop.call_at(_loop_time(deadline), _expire, future)

        def finish(done: asyncio.Future) -> None:
            timer.cancel()
            self._pending.pop(rid, None)
            self.streams.forget((b"", rid))
            conn.calls.discard(rid)
            conn.last_used = time.monotonic()
            if result.done():
                return  # the caller gave up
            if done.cancelled():
                result.cancel()
                return
            error = done.exception()
            if isinstance(error, asyncio.TimeoutError):
                self.stats["call_timeouts"] += 1
                error = RPCTimeout(f"{method!r} on {address} got no reply within {timeout:.3g} s")
            if error is not None:
                result.set_exception(error)
                return
            try:
                result.set_result(_decode_reply(address, method, done.result()))
            except RPCError as e:
                result.set_exception(e)

        future.add_done_callback(finish)
        result.add_done_callback(lambda r: future.cancel() if r.cancelled() else None)
        return result

    def _on_lost(self, conn: Connection) -> None:
        """A connection went away: the calls waiting on it fail now, not at their timeouts."""
        for rid in list(conn.calls):
            future = self._pending.get(rid)
            if future is not None and not future.done():
                future.set_exception(PeerUnreachable(f"{conn.address} disconnected during the call"))
                future.exception()

    # ------------------------------------------------------------------ sending

    def _send(
        self,
        io: SocketIO,
        prefix: list[bytes],
        header: dict,
        packed: Packed,
        deadline: float,
        stall: float | None = None,
    ) -> Awaitable[None] | None:
        """Send one message: header + inline buffers, then streamed buffers in chunks.

        A small unshaped message the socket takes at once is sent right here and None is returned
        (the common case: no task, no future); otherwise the returned awaitable finishes the send.
        Sends wait (asynchronously) while the peer's queue is full, which is the flow control that keeps
        a fast sender from piling a huge stream into the receiver's memory; a peer that disconnects
        meanwhile closes the socket under the send, which then fails with ``PeerUnreachable``. With
        ``stall``, a send the socket refuses for that many seconds fails with ``RPCTimeout``.
        """
        header["v"] = PROTOCOL
        header["b"] = packed.body
        if not self.links.shaped:
            sizes = [int(b.numel()) for b in packed.buffers]
            if not sizes or max(sizes) <= self.inline_limit:
                header["L"] = sizes
                frames = [*prefix, msgpack.packb(header, use_bin_type=True), *(frame(b) for b in packed.buffers)]
                try:
                    sent = io.try_send(frames)
                except zmq.ZMQError as e:
                    raise PeerUnreachable(f"send failed: {e}") from None
                if sent:
                    self.stats["bytes_sent"] += len(packed.body) + sum(sizes)
                    return None
        return self._send_slowly(io, prefix, header, packed, deadline, stall)

    async def _send_slowly(
        self, io: SocketIO, prefix: list[bytes], header: dict, packed: Packed, deadline: float, stall: float | None
    ) -> None:
        def until() -> float:
            return deadline if stall is None else min(deadline, time.monotonic() + stall)

        sizes = [int(b.numel()) for b in packed.buffers]
        streamed = [i for i, n in enumerate(sizes) if n > self.inline_limit]
        inline = [packed.buffers[i] for i in range(len(sizes)) if i not in streamed] if streamed else packed.buffers
        header["L"] = sizes
        if streamed:
            header["S"] = streamed
        first_size = len(packed.body) + sum(int(b.numel()) for b in inline)
        await self._shape(header, first_size)
        frames = [*prefix, msgpack.packb(header, use_bin_type=True), *(frame(b) for b in inline)]
        try:
            await io.send(frames, until())
        except zmq.ZMQError as e:
            raise PeerUnreachable(f"send failed: {e}") from None
        except asyncio.TimeoutError:
            raise RPCTimeout("could not send before the deadline") from None
        self.stats["bytes_sent"] += first_size
        for index in streamed:
            data = packed.buffers[index]
            for offset in range(0, sizes[index], self.chunk_size):
                piece = data[offset : offset + self.chunk_size]
                chunk = {"v": PROTOCOL, "k": CHUNK, "i": header["i"], "x": index, "o": offset}
                await self._shape(chunk, int(piece.numel()))
                if deadline - time.monotonic() <= 0:
                    raise RPCTimeout("could not send before the deadline")
                await asyncio.sleep(0)  # a stream must not hold the loop while the socket keeps taking chunks
                try:
                    await io.send([*prefix, msgpack.packb(chunk), frame(piece)], until())
                except asyncio.TimeoutError:
                    raise RPCTimeout("could not send before the deadline") from None
                except zmq.ZMQError as e:
                    raise PeerUnreachable(f"send failed mid-stream: {e}") from None
                self.stats["bytes_sent"] += int(piece.numel())

    async def _shape(self, header: dict, nbytes: int) -> None:
        if not self.links.shaped:
            return
        leave_at = self.links.uplink(nbytes)
        wait = leave_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        header["src"] = self.links.tag
        header["t"] = max(leave_at, time.monotonic())

    # ------------------------------------------------------------------ receiving

    def _on_frames(self, origin: bytes, peer: Any, frames: list) -> None:
        """Handle one raw message from the ROUTER (``origin`` = sender's routing id, ``peer`` = its proven
        id or ``_NO_PEER``) or from a DEALER (``origin`` = ``b""``: a reply to a call of ours)."""
        try:
            header = msgpack.unpackb(frames[0].buffer, raw=False)
        except Exception:
            self.stats["dropped_malformed"] += 1
            return
        if not isinstance(header, dict) or type(header.get("i")) is not int or header.get("k") not in (0, 1, 2, 3):
            self.stats["dropped_malformed"] += 1
            return
        rid, kind = header["i"], header["k"]
        if not origin and rid not in self._pending:
            self.stats["dropped_stale"] += 1  # a reply to a call that already gave up
            return
        try:
            if kind == CHUNK:
                self._on_chunk(origin, header, frames)
            else:
                self._on_head(origin, peer, header, frames)
        except BadMessage as e:
            self.stats["bad_messages"] += 1
            self.streams.forget((origin, rid))
            if origin and kind in (REQUEST, CHUNK):  # chunks on the serving side belong to a request
                self._reply_error(origin, rid, "BadMessage", str(e))
            elif not origin:
                future = self._pending.get(rid)
                if future is not None and not future.done():
                    future.set_exception(BadMessage(f"malformed reply: {e}"))

    def _on_head(self, origin: bytes, peer: Any, header: dict, frames: list) -> None:
        rid = header["i"]
        key = (origin, rid)
        if key in self.streams:
            raise BadMessage(f"request id {rid} is already in use")
        if header["k"] == ERROR:
            self._complete(origin, Incoming(header, [], 0, 0, peer))
            return
        if origin and header["k"] == REQUEST and self._admit:
            admit = self._admit.get(header.get("m"))  # type: ignore[arg-type]
            if admit is not None:
                admit(header, peer if self.encryption else None)  # BadMessage refuses it, answered at once
        # a request is budgeted per calling peer, a reply per call of ours (it answers what we asked for)
        budget = peer if origin else ("reply", rid)
        incoming = self.streams.read_head(header, frames, budget, None if origin else self._into.get(rid))
        self._note_arrival(incoming, header, incoming.nbytes - incoming.missing)
        if incoming.missing:
            self.streams.begin(key, incoming, self._stream_expired)
        else:
            self._complete(origin, incoming)

    def _stream_expired(self, key: tuple[bytes, int]) -> None:
        origin, rid = key
        if not origin:
            future = self._pending.get(rid)
            if future is not None and not future.done():
                future.set_exception(RPCTimeout("the reply's stream stalled"))

    def _on_chunk(self, origin: bytes, header: dict, frames: list) -> None:
        key = (origin, header["i"])
        got = self.streams.read_chunk(key, header, frames)
        if got is None:
            return
        incoming, size = got
        self._note_arrival(incoming, header, size)
        if incoming.missing == 0:
            self._complete(origin, incoming)

    def _note_arrival(self, incoming: Incoming, header: dict, nbytes: int) -> None:
        if not self.links.shaped:
            return
        src, sent_at = header.get("src"), header.get("t")
        if not isinstance(src, str) or not isinstance(sent_at, (int, float)):
            return
        if header["k"] != CHUNK and self.links.drop(src, self.links.tag):
            incoming.dropped = True
        incoming.release_at = max(incoming.release_at, self.links.arrival(src, float(sent_at), nbytes))

    def _complete(self, origin: bytes, incoming: Incoming) -> None:
        if incoming.dropped:
            self.stats["dropped_by_link"] += 1
            return
        self.stats["bytes_received"] += incoming.nbytes
        wait = incoming.release_at - time.monotonic()
        if wait > 0:
            asyncio.get_running_loop().call_later(wait, self._deliver_held, origin, incoming)
        else:
            self._deliver(origin, incoming)

    def _deliver_held(self, origin: bytes, incoming: Incoming) -> None:
        self.lateness.add(time.monotonic() - incoming.release_at)
        self._deliver(origin, incoming)

    def _deliver(self, origin: bytes, incoming: Incoming) -> None:
        if self._closed:
            return
        if origin:
            if incoming.header["k"] != REQUEST:
                self.stats["dropped_malformed"] += 1
                return
            self._serve(origin, incoming)
            return
        future = self._pending.get(incoming.header["i"])
        if future is not None and not future.done():
            future.set_result(incoming)


def _loop_time(deadline: float) -> float:
    """Convert a ``time.monotonic()`` deadline to the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


def _decode_reply(address: str, method: str, incoming: Incoming) -> Any:
    """The reply a call gets, or the typed error its peer answered with."""
    header = incoming.header
    if header["k"] not in (REPLY, ERROR):
        raise BadMessage(f"{address} answered {method!r} with a message of kind {header['k']}")
    if header["k"] == ERROR:
        kind, message = _error_fields(header)
        if kind == "BadMessage":
            raise BadMessage(f"{address} could not read our {method!r} call: {message}")
        raise RemoteError(kind, message, method)
    try:
        return unpack(header.get("b", b""), incoming.buffers)
    except BadMessage as e:
        raise BadMessage(f"bad reply to {method!r} from {address}: {e}") from None


def _quiet(future: asyncio.Future) -> asyncio.Future:
    """Mark ``future``'s exception as retrieved once it is done: a lookup that abandoned it (churn) must not
    leave "exception was never retrieved" on stderr; whoever still awaits it gets the exception as usual."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


def _error_fields(header: dict) -> tuple[str, str]:
    fields = header.get("e")
    if isinstance(fields, list) and len(fields) == 2 and all(isinstance(f, str) for f in fields):
        return fields[0], fields[1]
    return "BadMessage", "unreadable error reply"


async def measure_loopback(nbytes: int = 32 << 20, timeout: float = 60.0) -> float:
    """Bytes/s one endpoint moves to another in this process (best of two transfers of ``nbytes``): the
    budget link shaping can count on, and the yardstick for bulk-transfer benchmarks."""
    import torch

    async with Endpoint() as a, Endpoint() as b:
        b.register("sink", lambda payload, ctx: None)
        payload = torch.zeros(nbytes, dtype=torch.uint8)
        await a.call(b.address, "sink", payload[:1024])  # connect first: time the transfer only
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            await a.call(b.address, "sink", payload, timeout=timeout)
            best = min(best, time.perf_counter() - t0)
    return nbytes / best
