"""Typed errors of the RPC layer.

Callers catch these to tell apart a slow peer (``RPCTimeout``), a dead one (``PeerUnreachable``), a
peer that ran the call and failed (``RemoteError``) and traffic that makes no sense (``BadMessage``);
the fault-tolerant protocols above (DHT, averaging, experts) treat each differently.
"""

from __future__ import annotations


class RPCError(Exception):
    """Base class of every error raised by :meth:`hivesim.net.Endpoint.call`."""


class RPCTimeout(RPCError, TimeoutError):
    """The remote peer did not answer before the call's deadline."""


class PeerUnreachable(RPCError, ConnectionError):
    """No connection to the remote peer could be made (refused, bad address, or it went away)."""


class BadMessage(RPCError, ValueError):
    """A message could not be decoded: truncated, malformed, lying about its sizes or too large."""


class RemoteError(RPCError):
    """The remote handler raised; carries the remote exception's type name and message.

    ``remote_type`` is ``"UnknownMethod"`` when the peer has no handler of that name and
    ``"Overloaded"`` when it refused the call because too many were already running.
    """

    def __init__(self, remote_type: str, message: str, method: str = "") -> None:
        self.remote_type = remote_type
        self.remote_message = message
        self.method = method
        where = f" in {method!r}" if method else ""
        super().__init__(f"remote {remote_type}{where}: {message}")
