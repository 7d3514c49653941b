"""Process-wide resource limits for many peers in one process.

A study may pack hundreds of peers into one process, each with a ROUTER socket and a pool of
outgoing DEALERs. ZeroMQ allows 1,023 sockets per context by default and every socket and TCP
connection costs file descriptors, so both limits are raised once, before the first socket exists.
"""

from __future__ import annotations

import resource
import threading

import zmq
import zmq.asyncio

_lock = threading.Lock()
_context: zmq.asyncio.Context | None = None


def raise_open_file_limit(target: int = 1 << 20) -> int:
    """Raise the soft RLIMIT_NOFILE up to the hard limit (or ``target``); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    except (ValueError, OSError):
        return soft


def shared_context() -> zmq.asyncio.Context:
    """The one ZeroMQ context of this process, created with raised socket and file limits."""
    global _context
    with _lock:
        if _context is None or _context.closed:
            nofile = raise_open_file_limit()
            ctx = zmq.asyncio.Context()
            ceiling = ctx.get(zmq.SOCKET_LIMIT)
            ctx.set(zmq.MAX_SOCKETS, max(1023, min(ceiling, nofile // 2)))
            _context = ctx
        return _context
