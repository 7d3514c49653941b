"""Reassembly of streamed messages, with budgets an attacker cannot stretch.

A message's header declares its buffers' sizes; buffers above the sender's inline limit follow as chunks
that are copied straight into a preallocated tensor. Everything a header claims is checked before any
work: the number of buffers, each size, the total against ``max_message_bytes``. What one peer may make
this endpoint wait for is budgeted *per peer*: its declared-but-missing bytes (``max_pending_bytes_per_peer``)
and its time (a stream that stops progressing for ``idle_timeout`` is dropped; no stream lives longer than
``max_timeout``, whatever the header asks). Chunks are accepted only at the next expected offset, so the
bytes held never exceed the bytes received (sparse or overlapping writes would touch a fresh page each).
Across all peers, the bytes actually received into incomplete streams are capped by ``max_pending_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from hivesim.net.errors import BadMessage

logger = logging.getLogger(__name__)

Key = tuple[bytes, int]  # (the connection a message came on, its request id)


class Incoming:
    """A message being received: its header, its buffers, and where its stream stands."""

    __slots__ = ("header", "buffers", "missing", "nbytes", "release_at", "dropped", "timer", "peer", "streamed",
                 "position", "offset", "deadline", "last_progress", "sizes")

    def __init__(self, header: dict, buffers: list, missing: int, nbytes: int, peer: Any = None) -> None:
        self.header = header
        self.buffers = buffers
        self.missing = missing
        self.nbytes = nbytes
        self.release_at = 0.0
        self.dropped = False
        self.timer: asyncio.TimerHandle | None = None
        self.peer = peer  # whose budget the stream is charged to
        self.streamed: list[int] = []  # streamed buffer indices, in the order their chunks come
        self.sizes: list[int] = []
        self.position = 0  # index into ``streamed`` of the buffer being received
        self.offset = 0  # next expected byte offset in that buffer
        self.deadline = 0.0  # loop time after which the stream is dropped
        self.last_progress = 0.0  # loop time of the last chunk


class StreamReassembly:
    """The incomplete streamed messages of one endpoint.

    Args:
        max_message_bytes: largest message (all buffers together) accepted.
        max_buffers: most buffers one message may declare (checked before anything else).
        max_pending_bytes: most bytes received into incomplete streams, all peers together.
        max_pending_bytes_per_peer: most declared-but-missing bytes one peer may have outstanding.
        idle_timeout: seconds a stream may go without a chunk.
        max_timeout: the longest any stream may take, whatever its header asks.
        default_timeout: a stream's time when its header names none.
        stats: the endpoint's counters.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int,
        max_buffers: int,
        max_pending_bytes: int,
        max_pending_bytes_per_peer: int,
        idle_timeout: float,
        max_timeout: float,
        default_timeout: float,
        stats: Counter,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_buffers = max_buffers
        self.max_pending_bytes = max_pending_bytes
        self.max_pending_bytes_per_peer = max_pending_bytes_per_peer
        self.idle_timeout = idle_timeout
        self.max_timeout = max_timeout
        self.default_timeout = default_timeout
        self.stats = stats
        self.incoming: dict[Key, Incoming] = {}
        self.received_bytes = 0  # bytes held in incomplete streams
        self.reserved: Counter = Counter()  # per peer: declared bytes not received yet

    @property
    def pending_bytes(self) -> int:
        """Bytes declared by incomplete streams and not received yet, all peers together."""
        return sum(self.reserved.values())

    def __contains__(self, key: Key) -> bool:
        return key in self.incoming

    def read_head(self, header: dict, frames: list, peer: Any, into: Callable[[int, int], Any] | None) -> Incoming:
        """Check a message's header against its frames and the budgets; allocate its streamed buffers.

        Raises BadMessage for anything malformed or over a limit (nothing is kept then)."""
        sizes, streamed = header.get("L", []), header.get("S", [])
        if not isinstance(sizes, list) or not isinstance(streamed, list):
            raise BadMessage("buffer sizes and streamed indices must be lists")
        if len(sizes) > self.max_buffers:
            raise BadMessage(f"declares {len(sizes)} buffers, more than the {self.max_buffers} accepted")
        if not all(type(n) is int and n >= 0 for n in sizes):
            raise BadMessage("buffer sizes must be non-negative integers")
        if len(streamed) > len(sizes) or not all(type(i) is int and 0 <= i < len(sizes) for i in streamed):
            raise BadMessage("streamed buffer indices out of range")
        streamed_set = set(streamed)
        if len(streamed_set) != len(streamed):
            raise BadMessage("a buffer is streamed twice")
        body = header.get("b", b"")
        if not isinstance(body, bytes):
            raise BadMessage("message body must be bytes")
        total = sum(sizes)
        if total > self.max_message_bytes:
            raise BadMessage(f"declares {total} bytes, more than the {self.max_message_bytes} accepted")
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
        if missing:
            if self.reserved[peer] + missing > self.max_pending_bytes_per_peer:
                self.stats["streams_refused"] += 1
                raise BadMessage(f"this peer has too many streamed bytes in flight ({self.reserved[peer] + missing} "
                                 f"> {self.max_pending_bytes_per_peer})")
            if self.received_bytes >= self.max_pending_bytes:
                self.stats["streams_refused"] += 1
                raise BadMessage("the receiver holds too many incomplete streams; retry later")
            import torch  # only streamed (tensor or array) messages need it: DHT-only processes never load it

            for index in streamed:  # allocated lazily by the OS: pages only exist once data arrives
                try:
                    target = into(index, sizes[index]) if into is not None else None
                except Exception:  # a faulty provider costs the call its shortcut, not the reply
                    logger.exception("receive buffer provider failed")
                    target = None
                if not (isinstance(target, torch.Tensor) and target.dtype == torch.uint8 and target.dim() == 1
                        and target.numel() == sizes[index] and target.is_contiguous()):
                    target = torch.empty(sizes[index], dtype=torch.uint8)
                buffers[index] = target
        incoming = Incoming(header, buffers, missing, total + len(body), peer)
        if missing:
            incoming.streamed = [i for i in streamed if sizes[i] > 0]
            incoming.sizes = sizes
        return incoming

    def begin(self, key: Key, incoming: Incoming, on_expired: Callable[[Key], None]) -> None:
        """Hold ``incoming`` until its chunks arrive, charging its missing bytes to its peer."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = incoming.header.get("to")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            timeout = self.default_timeout
        incoming.deadline = now + max(1.0, min(float(timeout), self.max_timeout))
        incoming.last_progress = now
        self.reserved[incoming.peer] += incoming.missing
        self.incoming[key] = incoming
        incoming.timer = loop.call_at(min(incoming.deadline, now + self.idle_timeout), self._check, key, on_expired)

    def _check(self, key: Key, on_expired: Callable[[Key], None]) -> None:
        incoming = self.incoming.get(key)
        if incoming is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= incoming.deadline or now - incoming.last_progress >= self.idle_timeout:
            self.stats["expired_streams"] += 1
            self.forget(key)
            on_expired(key)
            return
        incoming.timer = loop.call_at(min(incoming.deadline, incoming.last_progress + self.idle_timeout),
                                      self._check, key, on_expired)

    def read_chunk(self, key: Key, header: dict, frames: list) -> tuple[Incoming, int] | None:
        """Copy one chunk into its stream: (the stream, the chunk's size), or None for a stray chunk.

        Raises BadMessage for a chunk that is not the stream's next (wrong buffer or offset, overflow)."""
        incoming = self.incoming.get(key)
        if incoming is None:
            self.stats["dropped_stray_chunks"] += 1
            return None
        index, offset = header.get("x"), header.get("o")
        if len(frames) != 2 or type(index) is not int or type(offset) is not int:
            raise BadMessage("a chunk needs a buffer index, an offset and one data frame")
        if incoming.position >= len(incoming.streamed):
            raise BadMessage("a chunk after the stream's last byte")
        expected = incoming.streamed[incoming.position]
        if index != expected or offset != incoming.offset:
            raise BadMessage(f"chunk for buffer {index} at {offset}; the stream expects buffer {expected} at "
                             f"{incoming.offset} (chunks arrive in order)")
        data = frames[1]
        size = len(data)
        if size == 0 or offset + size > incoming.sizes[index]:
            raise BadMessage(f"chunk of {size} bytes at {offset} does not fit buffer {index}")
        if self.received_bytes + size > self.max_pending_bytes:
            self.stats["streams_refused"] += 1
            raise BadMessage("the receiver holds too many incomplete streams")
        target = incoming.buffers[index]  # a uint8 torch tensor made by read_head
        target[offset : offset + size].numpy()[:] = memoryview(data.buffer)
        incoming.missing -= size
        self.reserved[incoming.peer] -= size
        self.received_bytes += size
        incoming.offset += size
        if incoming.offset == incoming.sizes[index]:
            incoming.position += 1
            incoming.offset = 0
        incoming.last_progress = asyncio.get_running_loop().time()
        if incoming.missing == 0:
            self._release(key, incoming)
        return incoming, size

    def forget(self, key: Key) -> None:
        """Drop an incomplete stream (a failed or abandoned call), returning its budget."""
        incoming = self.incoming.get(key)
        if incoming is not None:
            self._release(key, incoming)

    def _release(self, key: Key, incoming: Incoming) -> None:
        del self.incoming[key]
        self.reserved[incoming.peer] -= incoming.missing
        if self.reserved[incoming.peer] <= 0:
            del self.reserved[incoming.peer]
        received = sum(incoming.sizes[i] for i in incoming.streamed) - incoming.missing
        self.received_bytes -= received
        if incoming.timer:
            incoming.timer.cancel()

    def clear(self) -> None:
        for incoming in self.incoming.values():
            if incoming.timer:
                incoming.timer.cancel()
        self.incoming.clear()
        self.reserved.clear()
        self.received_bytes = 0
