"""One ZeroMQ socket driven straight from an asyncio event loop, and the socket settings hivesim uses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from hivesim.net.errors import PeerUnreachable

logger = logging.getLogger(__name__)

MiB = 1 << 20
# Messages queued per peer. A short receive queue pushes back on a fast sender through TCP, which bounds
# what a stream holds in the receiver's memory to about RECEIVE_QUEUE chunks.
RECEIVE_QUEUE = 32
SEND_QUEUE = 1000
SOCKET_BUFFER = 4 * MiB

# plain ints: pyzmq's flag enums cost a Python-level enum operation per test on the hot path
_POLLOUT, _EVENTS, _NOBLOCK, _SNDMORE = int(zmq.POLLOUT), int(zmq.EVENTS), int(zmq.NOBLOCK), int(zmq.SNDMORE)
# frames below this many bytes are copied into the message: cheaper than zero-copy bookkeeping
_COPY_BELOW = 1 << 16


class SocketIO:
    """Drives one ZeroMQ socket straight from the event loop, without pyzmq's asyncio layer.

    ZeroMQ's file descriptor is edge-triggered: it turns readable when the socket's state may have
    changed, and only a read of ``EVENTS`` tells what changed. So every wake-up drains the socket until it
    has nothing left (in batches, to stay fair to other work), and every send re-checks for input the
    send itself may have picked up. Sends try ``NOBLOCK`` first; only a full queue makes them wait, on a
    future the reader wakes when the socket turns writable. This saves a Future, a Task and several
    callbacks per message compared with ``zmq.asyncio``, which is where a DHT's small RPCs spend their time.
    """

    __slots__ = ("sock", "loop", "on_message", "fd", "scheduled", "writers", "closed", "wake_writers")
    BATCH = 256

    def __init__(self, sock: zmq.Socket, loop: asyncio.AbstractEventLoop, on_message: Callable[[list], None]) -> None:
        self.sock = sock
        self.loop = loop
        self.on_message = on_message
        self.fd = sock.getsockopt(zmq.FD)
        self.scheduled = False
        self.wake_writers = False  # the next check also wakes senders waiting for room
        self.writers: list[asyncio.Future] = []
        self.closed = False
        loop.add_reader(self.fd, self._signalled)
        self.kick()  # messages may have arrived before the reader was added

    def kick(self, wake_writers: bool = True) -> None:
        """Check the socket soon, without waiting for its descriptor to signal (``wake_writers``: and let
        waiting senders retry)."""
        self.wake_writers |= wake_writers
        if not self.scheduled and not self.closed:
            self.scheduled = True
            self.loop.call_soon(self._ready)

    def _signalled(self) -> None:
        self.wake_writers = True
        self._ready()

    def _ready(self) -> None:
        self.scheduled = False
        wake, self.wake_writers = self.wake_writers, False
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
        if wake and self.writers and not self.closed:
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
            # a refused send, too, processes the socket's pending commands and may consume the descriptor's
            # signal for waiting input: without a look, a message from another peer could sit unread. The
            # look does not wake the waiting senders (a ROUTER always reports room, so that would spin while
            # one peer does not read); they retry on their own short timer.
            self.kick(wake_writers=False)
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


def tune(sock: zmq.Socket) -> None:
    """Queue lengths and kernel buffers for one of hivesim's sockets."""
    sock.setsockopt(zmq.SNDHWM, SEND_QUEUE)
    sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)  # the kernel's defaults halve bulk throughput on loopback
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)


def frame(buffer: Any) -> Any:
    """A 1-D uint8 tensor as a frame ZeroMQ can send without copying."""
    return memoryview(buffer.numpy()) if buffer.numel() else b""
