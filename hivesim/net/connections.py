"""Outgoing connections: one DEALER socket per remote endpoint, in a bounded LRU pool.

A process packing hundreds of peers cannot hold a socket for every neighbour it ever called, so idle
connections beyond ``size`` are closed, oldest first. Each connection is watched by a ZeroMQ monitor:
the handshake finishing makes it usable, a refused or failed handshake fails the connect at once (a
CurveZMQ handshake fails when the peer at that address does not hold the key the address names), and a
later disconnect fails the calls waiting on it instead of leaving them to their timeouts.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

import zmq

from hivesim.net.errors import PeerUnreachable, RPCError
from hivesim.net.limits import shared_context
from hivesim.net.secure import CurveKeys, secure_client, split_address
from hivesim.net.socket_io import SocketIO, tune

_monitor_ids = itertools.count()
_HANDSHAKE_SUCCEEDED, _CONNECT_RETRIED, _DISCONNECTED = (
    int(zmq.EVENT_HANDSHAKE_SUCCEEDED), int(zmq.EVENT_CONNECT_RETRIED), int(zmq.EVENT_DISCONNECTED)
)
_HANDSHAKE_FAILED = frozenset(
    int(getattr(zmq, name)) for name in
    ("EVENT_HANDSHAKE_FAILED_NO_DETAIL", "EVENT_HANDSHAKE_FAILED_PROTOCOL", "EVENT_HANDSHAKE_FAILED_AUTH")
    if hasattr(zmq, name)
)
_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
for _event in _HANDSHAKE_FAILED:
    _EVENTS |= _event
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Connection:
    """One DEALER socket to one remote endpoint, and the calls waiting for replies through it."""

    __slots__ = ("address", "socket", "monitor", "io", "monitor_io", "ready", "calls", "last_used")

    def __init__(self, address: str, socket: zmq.Socket, monitor: zmq.Socket) -> None:
        self.address = address
        self.socket = socket
        self.monitor = monitor
        self.io: SocketIO | None = None  # reads replies
        self.monitor_io: SocketIO | None = None  # reads connection events
        self.ready: asyncio.Future | None = None  # done when the handshake succeeded (or failed)
        self.calls: set[int] = set()  # request ids waiting for a reply through this socket
        self.last_used = time.monotonic()

    @property
    def inflight(self) -> int:
        return len(self.calls)

    def close(self) -> None:
        if not self.socket.closed:
            try:
                self.socket.disable_monitor()
            except zmq.ZMQError:
                pass
        for driver in (self.io, self.monitor_io):
            if driver is not None:
                driver.close()
        if not self.socket.closed:
            self.socket.close(0)
        if not self.monitor.closed:
            self.monitor.close(0)
        if self.ready is not None and not self.ready.done():
            self.ready.cancel()


class ConnectionPool:
    """The outgoing connections of one endpoint.

    Args:
        keys: our Curve keys; an address that names a key is always called over CurveZMQ with them.
        require_key: refuse addresses that name no key (an encrypted endpoint never downgrades).
        connect_timeout: seconds a TCP + ZMTP (+ Curve) handshake may take.
        size: idle connections kept.
        on_reply: called with the frames of every message a connection receives.
        on_lost: called with a connection that disconnected (its waiting calls must fail).
        stats: the endpoint's counters.
    """

    def __init__(
        self,
        *,
        keys: CurveKeys | None,
        require_key: bool,
        connect_timeout: float,
        size: int,
        on_reply: Callable[[list], None],
        on_lost: Callable[[Connection], None],
        stats: Counter,
    ) -> None:
        self.keys = keys
        self.require_key = require_key
        self.connect_timeout = connect_timeout
        self.size = size
        self.on_reply = on_reply
        self.on_lost = on_lost
        self.stats = stats
        self.connections: OrderedDict[str, Connection] = OrderedDict()
        self._connecting: dict[str, asyncio.Future] = {}
        self.closed = False

    def __len__(self) -> int:
        return len(self.connections)

    def get(self, address: str) -> Connection | None:
        """An open connection to ``address`` (marked most recently used), or None."""
        conn = self.connections.get(address)
        if conn is not None:
            self.connections.move_to_end(address)
        return conn

    async def connect(self, address: str, deadline: float) -> Connection:
        """An open connection to ``address``, made if needed (one handshake however many callers wait)."""
        conn = self.get(address)
        if conn is not None:
            return conn
        waiting = self._connecting.get(address)
        if waiting is not None:
            return await asyncio.shield(waiting)
        future = asyncio.get_running_loop().create_future()
        self._connecting[address] = future
        try:
            conn = await self._open(address, deadline)
            future.set_result(conn)
            return conn
        except BaseException as e:
            future.set_exception(e if isinstance(e, Exception) else RPCError("connect cancelled"))
            future.exception()  # mark retrieved: the other waiters may be gone
            raise
        finally:
            self._connecting.pop(address, None)

    async def _open(self, address: str, deadline: float) -> Connection:
        try:
            base, server_key = split_address(address)
        except ValueError as e:
            raise PeerUnreachable(str(e)) from None
        if server_key is None and self.require_key:
            raise PeerUnreachable(
                f"{address} names no peer key; an encrypted endpoint only calls addresses of the form "
                "tcp://host:port/<key> (use the peer's full address, e.g. from its log or get_visible_maddrs())"
            )
        ctx = shared_context()
        try:
            sock = zmq.Socket(ctx, zmq.DEALER)  # plain sockets: SocketIO drives them
        except zmq.ZMQError as e:
            raise _out_of_sockets(address, e) from None
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer we are not connected to
        tune(sock)
        if base.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        if server_key is not None:
            if self.keys is None:
                sock.close(0)
                raise PeerUnreachable(f"{address} is an encrypted peer and this endpoint has no keys")
            secure_client(sock, self.keys, server_key)
        # The monitor stays for the socket's life: a DISCONNECTED event fails the calls in flight at once.
        # Each monitor gets an address of its own: pyzmq's default name reuses the socket's file
        # descriptor number, which a closed socket's monitor may still hold.
        monitor_address = f"inproc://hivesim-monitor-{next(_monitor_ids)}"
        try:
            sock.monitor(monitor_address, _EVENTS)
            monitor = zmq.Socket(ctx, zmq.PAIR)
        except zmq.ZMQError as e:
            sock.close(0)
            raise _out_of_sockets(address, e) from None
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(monitor_address)
        loop = asyncio.get_running_loop()
        conn = Connection(address, sock, monitor)
        conn.ready = loop.create_future()
        conn.monitor_io = SocketIO(monitor, loop, lambda frames: self._on_event(conn, frames))
        try:
            try:
                sock.connect(base)
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
        if self.closed:
            conn.close()
            raise RPCError("the endpoint is closed")
        conn.io = SocketIO(sock, loop, self.on_reply)
        self.connections[address] = conn
        self.stats["connections_opened"] += 1
        self.trim()
        return conn

    def trim(self) -> None:
        """Close idle connections beyond ``size``, least recently used first."""
        excess = len(self.connections) - self.size
        for address in list(self.connections):
            if excess <= 0:
                break
            if self.connections[address].inflight == 0:
                self.drop(address)
                excess -= 1

    def drop(self, address: str) -> None:
        conn = self.connections.pop(address, None)
        if conn is None:
            return
        conn.close()
        self.stats["connections_closed"] += 1

    def _on_event(self, conn: Connection, frames: list) -> None:
        event = struct.unpack_from("=H", frames[0].buffer)[0] if frames and len(frames[0]) >= 2 else -1
        ready = conn.ready
        if ready is not None and not ready.done():
            if event == _HANDSHAKE_SUCCEEDED:
                ready.set_result(None)
            elif event == _CONNECT_RETRIED:
                ready.set_exception(PeerUnreachable(f"{conn.address} refused the connection"))
            elif event in _HANDSHAKE_FAILED:
                self.stats["handshakes_failed"] += 1
                ready.set_exception(PeerUnreachable(
                    f"the handshake with {conn.address} failed: the peer there does not hold the key its "
                    "address names (or speaks another protocol)"))
            return  # a disconnect before the handshake is retried by ZeroMQ until the connect timeout
        if event != _DISCONNECTED:
            return
        self.stats["disconnects"] += 1
        self.on_lost(conn)
        if self.connections.get(conn.address) is conn:
            self.connections.pop(conn.address)
            self.stats["connections_closed"] += 1
        conn.close()

    def close(self) -> None:
        self.closed = True
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()
        for fut in self._connecting.values():
            fut.cancel()


def _out_of_sockets(address: str, error: zmq.ZMQError) -> PeerUnreachable:
    if error.errno in _OUT_OF_DESCRIPTORS or "Too many" in str(error):
        return PeerUnreachable(f"cannot open a connection to {address}: this process is out of sockets or file "
                               f"descriptors ({error}); close idle peers or raise the limit (ulimit -n)")
    return PeerUnreachable(f"cannot open a connection to {address}: {error}")
