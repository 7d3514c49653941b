"""Authenticated, encrypted transport: CurveZMQ keys that *are* a peer's Ed25519 identity.

A peer's Curve (X25519) key pair is derived from its Ed25519 key, the standard birational map between the
two curves (the X25519 secret is the Ed25519 signing scalar, the X25519 public key the Montgomery form of
the Ed25519 public key). So there is nothing to exchange or sign: whoever completes a CurveZMQ handshake
with key ``K`` holds the Ed25519 key whose Montgomery form is ``K``, and a peer id is a hash of ``K``
(:func:`hivesim.net.identity.peer_id_from_public_key`). Two consequences:

* An address names its peer: ``tcp://host:port/<curve public key, hex>``. A caller pins the server key it
  connects to, so a reply can only come from that peer and a relay on the path sees ciphertext; an
  address that points at someone else fails the handshake (:class:`PeerUnreachable`).
* The server learns each caller's key from the handshake (through a ZAP handler, one per process) and hands
  handlers the caller's peer id (``CallContext.peer_id``), which protocols use instead of any id the
  caller claims in its payload.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from typing import Any

import zmq
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

_P = 2**255 - 19
KEY_BYTES = 32
PEER_ID_BYTES = 20
_ADDRESS = re.compile(r"^(tcp://(?:\[[0-9a-fA-F:.]+\]|[^/\s\[\]]+):\d{1,5})(?:/([0-9a-f]{64}))?$")


class CurveKeys:
    """A peer's X25519 key pair for CurveZMQ, derived from its Ed25519 identity."""

    __slots__ = ("public", "secret")

    def __init__(self, public: bytes, secret: bytes) -> None:
        self.public = public
        self.secret = secret

    @classmethod
    def from_identity(cls, identity: Any) -> "CurveKeys":
        # Ed25519's signing scalar is the clamped first half of SHA-512(seed); X25519 clamps the same way
        secret = hashlib.sha512(identity.private_bytes()).digest()[:KEY_BYTES]
        public = X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(public, secret)


@functools.lru_cache(maxsize=65536)
def curve_public_key(ed25519_public_key: bytes) -> bytes:
    """The X25519 (Montgomery) form ``u = (1 + y) / (1 - y)`` of an Ed25519 public key.

    Raises ValueError for bytes that are no curve point's encoding of this form (y >= p, or y = 1).
    """
    if len(ed25519_public_key) != KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {KEY_BYTES} bytes, got {len(ed25519_public_key)}")
    y = int.from_bytes(ed25519_public_key, "little") & ((1 << 255) - 1)
    if y >= _P or y == 1:
        raise ValueError("not an Ed25519 public key")
    u = (1 + y) * pow(1 - y, _P - 2, _P) % _P
    return u.to_bytes(KEY_BYTES, "little")


def peer_id_from_curve_key(curve_key: bytes) -> bytes:
    """The 160-bit id of the peer whose Curve public key is ``curve_key``."""
    return hashlib.sha256(b"hivesim-peer" + curve_key).digest()[:PEER_ID_BYTES]


def format_address(base: str, curve_key: bytes | None) -> str:
    """``tcp://host:port`` plus the peer's key, if it has one."""
    return base if curve_key is None else f"{base}/{curve_key.hex()}"


@functools.lru_cache(maxsize=65536)
def split_address(address: str) -> tuple[str, bytes | None]:
    """``tcp://host:port[/key]`` -> (``tcp://host:port``, key or None). ValueError for anything else."""
    if not isinstance(address, str):
        raise ValueError(f"an address is a string, got {type(address).__name__}")
    match = _ADDRESS.match(address)
    if match is None:
        raise ValueError(f"not a peer address: {address!r} (expected tcp://host:port/<peer key>)")
    base, key = match.groups()
    return base, None if key is None else bytes.fromhex(key)


@functools.lru_cache(maxsize=65536)
def address_peer_id(address: str) -> bytes | None:
    """The id of the peer an address names; None for an address without a key (or not an address)."""
    try:
        key = split_address(address)[1]
    except ValueError:
        return None
    return None if key is None else peer_id_from_curve_key(key)


class _Authenticator:
    """The process's ZAP handler: admits every CurveZMQ client and labels its messages with its peer id.

    ZeroMQ asks one ZAP handler per context about each new incoming connection; the handler's answer
    sets the ``User-Id`` property of every message that arrives on that connection. Anyone may call a
    peer, so nobody is refused here: what matters is that the label is the key the client proved it holds.
    A thread, not a coroutine, because one context serves endpoints on several event loops.
    """

    def __init__(self, context: zmq.Context) -> None:
        self.socket = zmq.Socket(context, zmq.REP)  # a plain socket: the asyncio context would make an async one
        self.socket.linger = 0
        self.socket.bind("inproc://zeromq.zap.01")
        self.thread = threading.Thread(target=self._serve, name="hivesim-zap", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sock = self.socket
        while True:
            try:
                frames = sock.recv_multipart()
            except zmq.ZMQError:  # the context was terminated
                return
            reply = self._answer(frames)
            try:
                sock.send_multipart(reply)
            except zmq.ZMQError:
                return

    @staticmethod
    def _answer(frames: list[bytes]) -> list[bytes]:
        # ZAP request: version, request id, domain, address, identity, mechanism, credentials...
        if len(frames) < 6:
            return [b"1.0", b"", b"400", b"malformed ZAP request", b"", b""]
        version, request_id, mechanism = frames[0], frames[1], frames[5]
        if mechanism == b"CURVE" and len(frames) == 7 and len(frames[6]) == KEY_BYTES:
            user = peer_id_from_curve_key(frames[6]).hex().encode()
            return [version, request_id, b"200", b"OK", user, b""]
        if mechanism == b"NULL":
            return [version, request_id, b"200", b"OK", b"", b""]
        return [version, request_id, b"400", b"unsupported mechanism", b"", b""]


_authenticators: dict[int, _Authenticator] = {}
_lock = threading.Lock()


def ensure_authenticator(context: zmq.Context) -> None:
    """Start this context's ZAP handler once (idempotent, thread-safe)."""
    with _lock:
        key = id(context)
        if key not in _authenticators:
            _authenticators[key] = _Authenticator(context)


def secure_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make a bound socket a CurveZMQ server with ``keys``."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: CurveKeys, server_key: bytes) -> None:
    """Make a socket a CurveZMQ client that only completes a handshake with ``server_key``'s holder."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_key
