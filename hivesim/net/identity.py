"""Peer identity: an Ed25519 key pair, and signatures over msgpack-able records.

A peer id is derived from the public key, so nobody can claim an id without holding its key; the
DHT's signed records (a key that names its owner may only be written by that owner) build on this.
Records are signed in a canonical msgpack form (map keys sorted at every level), so two peers that
hold equal records always agree on the bytes that were signed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PEER_ID_BYTES = 20  # 160 bits: a Kademlia id


def peer_id_from_public_key(public_key: bytes) -> bytes:
    """The 160-bit id of the peer holding ``public_key`` (raw 32-byte Ed25519).

    It is a hash of the key's Curve form, the key the peer's transport authenticates with
    (:mod:`hivesim.net.secure`), so an id seen on a connection and an id named in a signed record agree.
    """
    from hivesim.net.secure import curve_public_key, peer_id_from_curve_key

    return peer_id_from_curve_key(curve_public_key(bytes(public_key)))


class Identity:
    """An Ed25519 key pair. ``Identity()`` makes a fresh one; :meth:`load_or_create` keeps one on disk."""

    def __init__(self, private_key: Ed25519PrivateKey | None = None) -> None:
        self._key = private_key or Ed25519PrivateKey.generate()
        self.public_key: bytes = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: bytes = peer_id_from_public_key(self.public_key)

    @classmethod
    def from_private_bytes(cls, data: bytes) -> "Identity":
        return cls(Ed25519PrivateKey.from_private_bytes(data))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "Identity":
        """Read the key at ``path``, or create it there (mode 0600) so a peer keeps its id across restarts."""
        path = Path(path)
        if path.exists():
            data = path.read_bytes()
            if len(data) != 32:
                raise ValueError(f"{path} is not a raw 32-byte Ed25519 private key ({len(data)} bytes)")
            return cls.from_private_bytes(data)
        identity = cls()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.private_bytes())
        return identity

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        """Copies (to another process of the same user) carry the raw private key: the key object itself
        cannot be copied. Treat such a copy as the key."""
        return Identity.from_private_bytes, (self.private_bytes(),)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def sign_record(self, record: Any) -> bytes:
        """Signature over the canonical encoding of a msgpack-able ``record``."""
        return self.sign(canonical_bytes(record))

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id.hex()})"


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is ``public_key``'s signature of ``data``; never raises on bad input."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), bytes(data))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def verify_record(public_key: bytes, record: Any, signature: bytes) -> bool:
    try:
        data = canonical_bytes(record)
    except (TypeError, ValueError):
        return False
    return verify(public_key, data, signature)


def canonical_bytes(record: Any) -> bytes:
    """msgpack with map keys sorted at every level, tuples as lists: equal records, equal bytes."""
    return msgpack.packb(_canonical(record), use_bin_type=True)


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        items = [(_canonical(k), _canonical(v)) for k, v in value.items()]
        items.sort(key=lambda kv: msgpack.packb(kv[0], use_bin_type=True))
        return _SortedMap(items)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


class _SortedMap(dict):
    """A dict that msgpack packs in the order it was built (dicts keep insertion order)."""

    def __init__(self, items: list[tuple[Any, Any]]) -> None:
        super().__init__(items)
