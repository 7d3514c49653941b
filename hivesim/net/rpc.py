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
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from hivesim.net.errors import BadMessage, PeerUnreachable, RemoteError, RPCError, RPCTimeout
from hivesim.net.limits import shared_context
from hivesim.net.links import IdentityLinks, LinkModel
from hivesim.net.serialization import Packed, pack, unpack

logger = logging.getLogger(__name__)

REQUEST, REPLY, ERROR, CHUNK = 0, 1, 2, 3
PROTOCOL = 1
MiB = 1 << 20
# Messages queued per peer. A short receive queue pushes back on a fast sender through TCP, which bounds
# what a stream holds in the receiver's memory to about RECEIVE_QUEUE chunks.
RECEIVE_QUEUE = 32
SEND_QUEUE = 1000
SOCKET_BUFFER = 4 * MiB

_monitor_ids = itertools.count()
# plain ints: pyzmq's flag enums cost a Python-level enum operation per test on the hot path
_POLLIN, _POLLOUT, _EVENTS, _NOBLOCK, _SNDMORE = (
    int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.EVENTS), int(zmq.NOBLOCK), int(zmq.SNDMORE)
)
_HANDSHAKE_SUCCEEDED, _CONNECT_RETRIED, _DISCONNECTED = (
    int(zmq.EVENT_HANDSHAKE_SUCCEEDED), int(zmq.EVENT_CONNECT_RETRIED), int(zmq.EVENT_DISCONNECTED)
)
# frames below this many bytes are copied into the message: cheaper than zero-copy bookkeeping
_COPY_BELOW = 1 << 16

Handler = Callable[[Any, "CallContext"], Awaitable[Any] | Any]


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


class _Incoming:
    """A message being received: its header, its buffers, and how many streamed bytes are missing."""

    __slots__ = ("header", "buffers", "missing", "release_at", "dropped", "timer", "nbytes")

    def __init__(self, header: dict, buffers: list, missing: int, nbytes: int) -> None:
        self.header = header
        self.buffers = buffers
        self.missing = missing
        self.nbytes = nbytes
        self.release_at = 0.0
        self.dropped = False
        self.timer: asyncio.TimerHandle | None = None


class _SocketIO:
    """Drives one ZeroMQ socket straight from the event loop, without pyzmq's asyncio layer.

    ZeroMQ's file descriptor is edge-triggered: it turns readable when the socket's state may have
    changed, and only a read of ``EVENTS`` tells what changed. So every wake-up drains the socket until it
    has nothing left (in batches, to stay fair to other work), and every send re-checks for input the
    send itself may have picked up. Sends try ``NOBLOCK`` first; only a full queue makes them wait, on a
    future the reader wakes when the socket turns writable. This saves a Future, a Task and several
    callbacks per message compared with ``zmq.asyncio``, which is where a DHT's small RPCs spend their time.
    """

    __slots__ = ("sock", "loop", "on_message", "fd", "scheduled", "writers", "closed")
    BATCH = 256

    def __init__(self, sock: zmq.Socket, loop: asyncio.AbstractEventLoop, on_message: Callable[[list], None]) -> None:
        self.sock = sock
        self.loop = loop
        self.on_message = on_message
        self.fd = sock.getsockopt(zmq.FD)
        self.scheduled = False
        self.writers: list[asyncio.Future] = []
        self.closed = False
        loop.add_reader(self.fd, self._ready)
        self.kick()  # messages may have arrived before the reader was added

    def kick(self) -> None:
        """Check the socket soon, without waiting for its descriptor to signal."""
        if not self.scheduled and not self.closed:
            self.scheduled = True
            self.loop.call_soon(self._ready)

    def _ready(self) -> None:
        self.scheduled = False
        sock = self.sock
        for _ in range(self.BATCH):
            if self.closed:
                return
            try:  # receive until the socket says it has nothing: that also re-arms its descriptor
                frame = sock.recv(_NOBLOCK, copy=False)
                frames = [frame]
                while frame.more:  # the parts of a message arrive together
                    frame = sock.recv(0, copy=False)
                    frames.append(frame)
            except zmq.Again:
                break
            except zmq.ZMQError:
                return  # closed under us
            try:
                self.on_message(frames)
            except Exception:  # a bug in a handler path must not stop the reading
                logger.exception("error while handling a message")
        else:
            self.kick()  # more may be waiting: continue after other callbacks had their turn
        if self.writers and not self.closed:
            try:
                if sock.getsockopt(_EVENTS) & _POLLOUT:
                    self._wake_writers()
            except zmq.ZMQError:
                pass

    def _wake_writers(self) -> None:
        writers, self.writers = self.writers, []
        for waiter in writers:
            if not waiter.done():
                waiter.set_result(None)

    def try_send(self, frames: list) -> bool:
        """Queue ``frames`` if the socket takes them now; False if its queue is full."""
        sock = self.sock
        last = len(frames) - 1
        try:  # a multipart message is atomic: only its first frame can meet a full queue
            for i, frame in enumerate(frames):
                sock.send(frame, _NOBLOCK | _SNDMORE if i < last else _NOBLOCK, copy=len(frame) < _COPY_BELOW)
        except zmq.Again:
            return False
        self.kick()  # the send may have consumed the descriptor's signal for waiting input: look soon
        return True

    async def send(self, frames: list, deadline: float) -> None:
        """Send, waiting while the queue is full. Raises TimeoutError after ``deadline`` (monotonic),
        PeerUnreachable if the socket is closed meanwhile, zmq.ZMQError on other socket errors."""
        while True:
            if self.closed:
                raise PeerUnreachable("the connection closed while sending")
            if self.try_send(frames):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError()
            waiter = self.loop.create_future()
            self.writers.append(waiter)
            try:  # the short cap re-checks even if a writability signal was missed
                await asyncio.wait_for(waiter, min(left, 0.05))
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        """Stop reading and close the socket; senders waiting on it fail with PeerUnreachable."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.fd)
        except Exception:  # the loop may be closed already
            pass
        for waiter in self.writers:
            if not waiter.done():
                waiter.set_result(None)  # the sender sees `closed` and raises
        self.writers = []
        if not self.sock.closed:
            self.sock.close(0)


class _Connection:
    """One DEALER socket to one remote endpoint, with the task that reads its replies."""

    __slots__ = ("address", "socket", "monitor", "io", "monitor_io", "ready", "calls", "last_used")

    def __init__(self, address: str, socket: zmq.Socket, monitor: zmq.Socket) -> None:
        self.address = address
        self.socket = socket
        self.monitor = monitor
        self.io: _SocketIO | None = None  # reads replies
        self.monitor_io: _SocketIO | None = None  # reads connection events
        self.ready: asyncio.Future | None = None  # done when the handshake succeeded (or failed)
        self.calls: set[int] = set()  # request ids waiting for a reply through this socket
        self.last_used = time.monotonic()

    @property
    def inflight(self) -> int:
        return len(self.calls)

    def close(self) -> None:
        _close_monitored(self.socket, self.monitor, self.io, self.monitor_io)
        if self.ready is not None and not self.ready.done():
            self.ready.cancel()


class Endpoint:
    """A peer's network presence: serves registered handlers and calls other endpoints.

    Args:
        host: interface to bind (``"0.0.0.0"`` on a real cluster).
        port: TCP port, 0 picks a free one; :attr:`address` tells which.
        links: the link model (``IdentityLinks`` in deployment, ``ShapedLinks`` in simulation).
        advertise_host: host written into :attr:`address` when ``host`` is a wildcard.
        default_timeout: seconds a :meth:`call` waits when it is given no timeout.
        connect_timeout: seconds to wait for a TCP + ZMTP handshake with a new peer.
        max_message_bytes: largest message (all buffers together) accepted from a peer.
        max_pending_bytes: most bytes of incomplete streamed messages held at once.
        max_inflight: most handler calls running at once; more get an ``Overloaded`` error.
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
        default_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_message_bytes: int = 16 << 30,
        max_pending_bytes: int = 32 << 30,
        max_inflight: int = 1024,
        pool_size: int = 64,
        inline_limit: int = 4 * MiB,
        chunk_size: int = 4 * MiB,
        compression: Any = None,
    ) -> None:
        self.host = host
        self.port = port
        self.links: LinkModel = links if links is not None else IdentityLinks()
        self.advertise_host = advertise_host
        self.default_timeout = default_timeout
        self.connect_timeout = connect_timeout
        self.max_message_bytes = max_message_bytes
        self.max_pending_bytes = max_pending_bytes
        self.max_inflight = max_inflight
        self.pool_size = pool_size
        self.inline_limit = inline_limit
        self.chunk_size = chunk_size
        self.compression = compression
        self.stats: Counter[str] = Counter()
        self.lateness = Lateness()  # how late shaped messages were released: the emulation's error

        self._handlers: dict[str, Handler] = {}
        self._router: zmq.Socket | None = None
        self._router_io: _SocketIO | None = None
        self._pool: OrderedDict[str, _Connection] = OrderedDict()
        self._connecting: dict[str, asyncio.Future] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._into: dict[int, Callable[[int, int], Any]] = {}  # where a call's streamed reply buffers land
        self._incoming: dict[tuple[bytes, int], _Incoming] = {}
        self._pending_bytes = 0
        self._serving: set[asyncio.Task] = set()
        self._rids = itertools.count(1)
        self._closed = False
        self._address = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> "Endpoint":
        """Bind the ROUTER socket and start serving. Returns ``self``."""
        if self._router is not None:
            return self
        router = zmq.Socket(shared_context(), zmq.ROUTER)  # a plain socket: _SocketIO drives it
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        _tune(router)
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
        self._address = f"tcp://{shown}:{self.port}"
        self._router_io = _SocketIO(router, asyncio.get_running_loop(), self._on_routed)
        return self

    async def __aenter__(self) -> "Endpoint":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> str:
        """The address other peers call, e.g. ``tcp://127.0.0.1:40123``."""
        if not self._address:
            raise RuntimeError("the endpoint is not started: await endpoint.start() first")
        return self._address

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
        for incoming in self._incoming.values():
            if incoming.timer:
                incoming.timer.cancel()
        self._incoming.clear()
        self._pending_bytes = 0
        for conn in self._pool.values():
            conn.close()
        self._pool.clear()
        for fut in self._connecting.values():
            fut.cancel()
        if self._router_io is not None:
            self._router_io.close()
        if self._router is not None:
            self._router.close(0)

    # ------------------------------------------------------------------ serving

    def register(self, name: str, handler: Handler, *, replace: bool = False) -> None:
        """Serve ``handler(payload, ctx)`` (sync or async) under ``name``; its return value is the reply."""
        if name in self._handlers and not replace:
            raise ValueError(f"a handler named {name!r} is already registered")
        self._handlers[name] = handler

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    def _on_routed(self, frames: list) -> None:
        """A message on the ROUTER: the sender's identity, then the message."""
        if len(frames) < 2:
            self.stats["dropped_malformed"] += 1
            return
        self._on_frames(frames[0].bytes, frames[1:])

    def _on_reply(self, frames: list) -> None:
        """A message on one of our DEALERs: a reply (or a chunk of one) to a call of ours."""
        self._on_frames(b"", frames)

    def _serve(self, origin: bytes, incoming: _Incoming) -> None:
        """Serve one request. A sync handler runs right here, in the reader's callback, and its reply is
        sent before the next message is read; an async handler (or a reply that must wait for the
        socket) gets a task."""
        header = incoming.header
        rid, method = header["i"], header.get("m")
        try:
            if not isinstance(method, str):
                raise BadMessage("a request needs a method name")
            handler = self._handlers.get(method)
            if handler is None:
                self._reply_error(origin, rid, "UnknownMethod", f"no handler named {method!r}")
                return
            if len(self._serving) > self.max_inflight:
                self.stats["overloaded"] += 1
                self._reply_error(origin, rid, "Overloaded", f"more than {self.max_inflight} calls running")
                return
            timeout = header.get("to")
            if not isinstance(timeout, (int, float)) or timeout <= 0:
                timeout = self.default_timeout
            deadline = time.monotonic() + min(float(timeout), 24 * 3600.0)
            payload = unpack(header.get("b", b""), incoming.buffers)
            src = header.get("src", "")
            ctx = CallContext(method, deadline, src if isinstance(src, str) else "")
            try:
                result = handler(payload, ctx)
            except BadMessage:
                raise
            except Exception as e:
                self._handler_failed(origin, rid, method, e)
                return
            if inspect.isawaitable(result):
                task = self._track(self._finish(origin, rid, method, result, ctx))
                if inspect.iscoroutine(result):  # a task cancelled before its first step (the endpoint
                    task.add_done_callback(lambda _: result.close())  # closed) never starts the handler
                return
            pending = self._reply(origin, rid, result, deadline)
            if pending is not None:
                self._track(pending)
        except BadMessage as e:
            self.stats["bad_messages"] += 1
            self._reply_error(origin, rid, "BadMessage", str(e))

    def _track(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)
        return task

    async def _finish(self, origin: bytes, rid: int, method: str, result: Awaitable, ctx: CallContext) -> None:
        """Await an async handler within the call's deadline (plus a second of grace), then reply."""
        try:
            async with asyncio.timeout(ctx.time_left + 1.0):
                value = await result
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
            await pending

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
            pending = self._send(self._router_io, [origin], {"k": REPLY, "i": rid}, packed, deadline)  # type: ignore[arg-type]
        except (zmq.ZMQError, RPCError):
            self.stats["reply_failed"] += 1  # the caller went away
            return None
        return None if pending is None else self._wait_reply(pending)

    async def _wait_reply(self, pending: Awaitable) -> None:
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
            PeerUnreachable: the peer cannot be connected to, or went away.
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
        conn: _Connection | None = self._pool.get(address)
        try:
            if conn is None:
                conn = await self._connection(address, deadline)
            else:
                self._pool.move_to_end(address)
            conn.calls.add(rid)
            header = {"k": REQUEST, "i": rid, "m": method, "to": round(timeout, 3)}
            pending = self._send(conn.io, [], header, packed, deadline)  # type: ignore[arg-type]
            if pending is not None:
                await pending
            self.stats["calls_sent"] += 1
            timer = asyncio.get_running_loop().call_at(_loop_time(deadline), _expire, future)
            try:
                incoming: _Incoming = await future
            finally:
                timer.cancel()
        except asyncio.TimeoutError:
            self.stats["call_timeouts"] += 1
            raise RPCTimeout(f"{method!r} on {address} got no reply within {timeout:.3g} s") from None
        finally:
            self._pending.pop(rid, None)
            self._into.pop(rid, None)
            self._forget_incoming((b"", rid))
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
        :meth:`call`. Cancelling the future abandons the call.
        """
        loop = asyncio.get_running_loop()
        conn = self._pool.get(address)
        if conn is None or self._closed or self.links.shaped:
            return loop.create_task(self.call(address, method, payload, timeout=timeout, compression=compression))
        result: asyncio.Future = loop.create_future()
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
            return loop.create_task(self.call(address, method, payload, timeout=timeout, compression=compression))
        self._pool.move_to_end(address)
        self.stats["calls_sent"] += 1
        future: asyncio.Future = loop.create_future()
        self._pending[rid] = future
        conn.calls.add(rid)
        timer = loop.call_at(_loop_time(deadline), _expire, future)

        def finish(done: asyncio.Future) -> None:
            timer.cancel()
            self._pending.pop(rid, None)
            self._forget_incoming((b"", rid))
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

    async def _connection(self, address: str, deadline: float) -> _Connection:
        conn = self._pool.get(address)
        if conn is not None:
            self._pool.move_to_end(address)
            return conn
        waiting = self._connecting.get(address)
        if waiting is not None:
            return await asyncio.shield(waiting)
        future = asyncio.get_running_loop().create_future()
        self._connecting[address] = future
        try:
            conn = await self._connect(address, deadline)
            future.set_result(conn)
            return conn
        except BaseException as e:
            future.set_exception(e if isinstance(e, Exception) else RPCError("connect cancelled"))
            future.exception()  # mark retrieved: the other waiters may be gone
            raise
        finally:
            self._connecting.pop(address, None)

    async def _connect(self, address: str, deadline: float) -> _Connection:
        if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://", "inproc://")):
            raise PeerUnreachable(f"not an endpoint address: {address!r} (expected tcp://host:port)")
        ctx = shared_context()
        sock = zmq.Socket(ctx, zmq.DEALER)  # plain sockets: _SocketIO drives them
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer we are not connected to
        _tune(sock)
        if address.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        # The monitor stays for the socket's life: a DISCONNECTED event fails the calls in flight at once
        # instead of leaving them to their timeouts.
        # Each monitor gets an address of its own: pyzmq's default name reuses the socket's file
        # descriptor number, which a closed socket's monitor may still hold.
        monitor_address = f"inproc://hivesim-monitor-{next(_monitor_ids)}"
        sock.monitor(monitor_address, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED)
        monitor = zmq.Socket(ctx, zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(monitor_address)
        loop = asyncio.get_running_loop()
        conn = _Connection(address, sock, monitor)
        conn.ready = loop.create_future()
        conn.monitor_io = _SocketIO(monitor, loop, lambda frames: self._on_monitor_event(conn, frames))
        try:
            try:
                sock.connect(address)
            except zmq.ZMQError as e:
                raise PeerUnreachable(f"cannot connect to {address!r}: {e}") from None
            left = min(deadline, time.monotonic() + self.connect_timeout) - time.monotonic()
            try:
                await asyncio.wait_for(conn.ready, max(0.0, left))
            except asyncio.TimeoutError:
                raise PeerUnreachable(f"no connection to {address} within {self.connect_timeout:.3g} s") from None
        except BaseException:
            conn.close()
            raise
        if self._closed:
            conn.close()
            raise RPCError("the endpoint is closed")
        conn.io = _SocketIO(sock, loop, self._on_reply)
        self._pool[address] = conn
        self.stats["connections_opened"] += 1
        self._trim_pool()
        return conn

    def _trim_pool(self) -> None:
        excess = len(self._pool) - self.pool_size
        for address in list(self._pool):
            if excess <= 0:
                break
            if self._pool[address].inflight == 0:
                self._drop_connection(address)
                excess -= 1

    def _drop_connection(self, address: str) -> None:
        conn = self._pool.pop(address, None)
        if conn is None:
            return
        conn.close()
        self.stats["connections_closed"] += 1

    def _on_monitor_event(self, conn: _Connection, frames: list) -> None:
        """Connection events: the handshake finishing (or being refused) and, later, the peer going away,
        which fails the calls waiting on ``conn`` at once."""
        event = struct.unpack_from("=H", frames[0].buffer)[0] if frames and len(frames[0]) >= 2 else -1
        ready = conn.ready
        if ready is not None and not ready.done():
            if event == _HANDSHAKE_SUCCEEDED:
                ready.set_result(None)
            elif event == _CONNECT_RETRIED:
                ready.set_exception(PeerUnreachable(f"{conn.address} refused the connection"))
            return  # a disconnect before the handshake is retried by ZeroMQ until the connect timeout
        if event != _DISCONNECTED:
            return
        self.stats["disconnects"] += 1
        for rid in list(conn.calls):
            future = self._pending.get(rid)
            if future is not None and not future.done():
                future.set_exception(PeerUnreachable(f"{conn.address} disconnected during the call"))
                future.exception()
        if self._pool.get(conn.address) is conn:
            self._pool.pop(conn.address)
            self.stats["connections_closed"] += 1
        conn.close()

    # ------------------------------------------------------------------ sending

    def _send(
        self,
        io: _SocketIO,
        prefix: list[bytes],
        header: dict,
        packed: Packed,
        deadline: float,
    ) -> Awaitable[None] | None:
        """Send one message: header + inline buffers, then streamed buffers in chunks.

        A small unshaped message the socket takes at once is sent right here and None is returned
        (the common case: no task, no future); otherwise the returned awaitable finishes the send.
        Sends wait (asynchronously) while the peer's queue is full, which is the flow control that keeps
        a fast sender from piling a huge stream into the receiver's memory; a peer that disconnects
        meanwhile closes the socket under the send, which then fails with ``PeerUnreachable``.
        """
        header["v"] = PROTOCOL
        header["b"] = packed.body
        if not self.links.shaped:
            sizes = [int(b.numel()) for b in packed.buffers]
            if not sizes or max(sizes) <= self.inline_limit:
                header["L"] = sizes
                frames = [*prefix, msgpack.packb(header, use_bin_type=True), *(_frame(b) for b in packed.buffers)]
                try:
                    sent = io.try_send(frames)
                except zmq.ZMQError as e:
                    raise PeerUnreachable(f"send failed: {e}") from None
                if sent:
                    self.stats["bytes_sent"] += len(packed.body) + sum(sizes)
                    return None
        return self._send_slowly(io, prefix, header, packed, deadline)

    async def _send_slowly(
        self, io: _SocketIO, prefix: list[bytes], header: dict, packed: Packed, deadline: float
    ) -> None:
        sizes = [int(b.numel()) for b in packed.buffers]
        streamed = [i for i, n in enumerate(sizes) if n > self.inline_limit]
        inline = [packed.buffers[i] for i in range(len(sizes)) if i not in streamed] if streamed else packed.buffers
        header["L"] = sizes
        if streamed:
            header["S"] = streamed
        first_size = len(packed.body) + sum(int(b.numel()) for b in inline)
        await self._shape(header, first_size)
        frames = [*prefix, msgpack.packb(header, use_bin_type=True), *(_frame(b) for b in inline)]
        try:
            await io.send(frames, deadline)
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
                    await io.send([*prefix, msgpack.packb(chunk), _frame(piece)], deadline)
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

    def _on_frames(self, origin: bytes, frames: list) -> None:
        """Handle one raw message from the ROUTER (``origin`` = sender identity) or a DEALER (``b""``)."""
        try:
            header = msgpack.unpackb(frames[0].buffer, raw=False)
        except Exception:
            self.stats["dropped_malformed"] += 1
            return
        if not isinstance(header, dict) or not isinstance(header.get("i"), int) or header.get("k") not in (0, 1, 2, 3):
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
                self._on_head(origin, header, frames)
        except BadMessage as e:
            self.stats["bad_messages"] += 1
            self._forget_incoming((origin, rid))
            if origin and kind in (REQUEST, CHUNK):  # chunks on the serving side belong to a request
                self._reply_error(origin, rid, "BadMessage", str(e))
            elif not origin:
                future = self._pending.get(rid)
                if future is not None and not future.done():
                    future.set_exception(BadMessage(f"malformed reply: {e}"))

    def _on_head(self, origin: bytes, header: dict, frames: list) -> None:
        rid = header["i"]
        if (origin, rid) in self._incoming:
            raise BadMessage(f"request id {rid} is already in use")
        if header["k"] == ERROR:
            self._complete(origin, _Incoming(header, [], 0, 0))
            return
        sizes, streamed = header.get("L", []), header.get("S", [])
        if not isinstance(sizes, list) or not all(isinstance(n, int) and n >= 0 for n in sizes):
            raise BadMessage("buffer sizes must be a list of non-negative integers")
        if not isinstance(streamed, list) or not all(isinstance(i, int) and 0 <= i < len(sizes) for i in streamed):
            raise BadMessage("streamed buffer indices out of range")
        if not isinstance(header.get("b", b""), bytes):
            raise BadMessage("message body must be bytes")
        total = sum(sizes)
        if total > self.max_message_bytes:
            raise BadMessage(f"declares {total} bytes, more than the {self.max_message_bytes} accepted")
        streamed_set = set(streamed)
        inline_frames = frames[1:]
        if len(inline_frames) != len(sizes) - len(streamed_set):
            raise BadMessage(f"declares {len(sizes) - len(streamed_set)} inline buffers, carries {len(inline_frames)}")
        buffers: list[Any] = []
        frame_iter = iter(inline_frames)
        missing = 0
        for index, size in enumerate(sizes):
            if index in streamed_set:
                buffers.append(None)
                missing += size
                continue
            frame = next(frame_iter)
            if len(frame) != size:
                raise BadMessage(f"buffer {index} declares {size} bytes, carries {len(frame)}")
            buffers.append(frame.buffer)
        if missing and self._pending_bytes + missing > self.max_pending_bytes:
            raise BadMessage(f"too many streamed bytes in flight ({self._pending_bytes + missing})")
        if streamed_set:
            import torch  # only streamed (tensor or array) messages need it: DHT-only processes never load it

            into = None if origin else self._into.get(rid)
            for index in streamed_set:  # allocated lazily by the OS: pages only exist once data arrives
                try:
                    target = into(index, sizes[index]) if into is not None else None
                except Exception:  # a faulty provider costs the call its shortcut, not the reply
                    logger.exception("receive buffer provider failed")
                    target = None
                if not (isinstance(target, torch.Tensor) and target.dtype == torch.uint8 and target.dim() == 1
                        and target.numel() == sizes[index] and target.is_contiguous()):
                    target = torch.empty(sizes[index], dtype=torch.uint8)
                buffers[index] = target
        incoming = _Incoming(header, buffers, missing, total + len(header.get("b", b"")))
        self._note_arrival(incoming, header, incoming.nbytes - missing)
        if missing:
            self._pending_bytes += missing
            self._incoming[(origin, rid)] = incoming
            timeout = header.get("to") if isinstance(header.get("to"), (int, float)) else self.default_timeout
            incoming.timer = asyncio.get_running_loop().call_later(
                max(1.0, float(timeout)), self._expire_incoming, (origin, rid)
            )
        else:
            self._complete(origin, incoming)

    def _on_chunk(self, origin: bytes, header: dict, frames: list) -> None:
        incoming = self._incoming.get((origin, header["i"]))
        if incoming is None:
            self.stats["dropped_stray_chunks"] += 1
            return
        index, offset = header.get("x"), header.get("o")
        if len(frames) != 2 or not isinstance(index, int) or not isinstance(offset, int):
            raise BadMessage("a chunk needs a buffer index, an offset and one data frame")
        streamed = incoming.header.get("S", ())
        if not 0 <= index < len(incoming.buffers) or index not in streamed:
            raise BadMessage(f"chunk for buffer {index}, which is not streamed")
        target = incoming.buffers[index]  # a uint8 torch tensor made by _on_head
        data = frames[1]
        size = len(data)
        if offset < 0 or offset + size > target.numel() or size > incoming.missing:
            raise BadMessage(f"chunk of {size} bytes at {offset} overflows buffer {index}")
        if size:
            target[offset : offset + size].numpy()[:] = memoryview(data.buffer)
        incoming.missing -= size
        self._pending_bytes -= size
        self._note_arrival(incoming, header, size)
        if incoming.missing == 0:
            del self._incoming[(origin, header["i"])]
            if incoming.timer:
                incoming.timer.cancel()
            self._complete(origin, incoming)

    def _note_arrival(self, incoming: _Incoming, header: dict, nbytes: int) -> None:
        if not self.links.shaped:
            return
        src, sent_at = header.get("src"), header.get("t")
        if not isinstance(src, str) or not isinstance(sent_at, (int, float)):
            return
        if header["k"] != CHUNK and self.links.drop(src, self.links.tag):
            incoming.dropped = True
        incoming.release_at = max(incoming.release_at, self.links.arrival(src, float(sent_at), nbytes))

    def _complete(self, origin: bytes, incoming: _Incoming) -> None:
        if incoming.dropped:
            self.stats["dropped_by_link"] += 1
            return
        self.stats["bytes_received"] += incoming.nbytes
        wait = incoming.release_at - time.monotonic()
        if wait > 0:
            asyncio.get_running_loop().call_later(wait, self._deliver_held, origin, incoming)
        else:
            self._deliver(origin, incoming)

    def _deliver_held(self, origin: bytes, incoming: _Incoming) -> None:
        self.lateness.add(time.monotonic() - incoming.release_at)
        self._deliver(origin, incoming)

    def _deliver(self, origin: bytes, incoming: _Incoming) -> None:
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

    def _expire_incoming(self, key: tuple[bytes, int]) -> None:
        if key in self._incoming:
            self.stats["expired_streams"] += 1
            self._forget_incoming(key)

    def _forget_incoming(self, key: tuple[bytes, int]) -> None:
        incoming = self._incoming.pop(key, None)
        if incoming is not None:
            self._pending_bytes -= incoming.missing
            if incoming.timer:
                incoming.timer.cancel()


def _tune(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.SNDHWM, SEND_QUEUE)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)  # the kernel's defaults halve bulk throughput on loopback
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)


def _close_monitored(
    sock: zmq.Socket, monitor: zmq.Socket, io: _SocketIO | None = None, monitor_io: _SocketIO | None = None
) -> None:
    if not sock.closed:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
    for driver in (io, monitor_io):
        if driver is not None:
            driver.close()
    if not sock.closed:
        sock.close(0)
    if not monitor.closed:
        monitor.close(0)


def _loop_time(deadline: float) -> float:
    """Convert a ``time.monotonic()`` deadline to the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(asyncio.TimeoutError())


def _frame(buffer: Any) -> Any:
    """A 1-D uint8 tensor as a frame ZeroMQ can send without copying."""
    return memoryview(buffer.numpy()) if buffer.numel() else b""


def _decode_reply(address: str, method: str, incoming: _Incoming) -> Any:
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
