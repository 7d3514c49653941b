"""Record validators: who may write a key, and what its value may look like.

A validator sees every record a node stores and every record a lookup returns. ``sign_value`` runs on
the writer before a record leaves; ``validate`` runs on every node that stores it and on every reader;
``strip_value`` undoes ``sign_value`` for the reader. Validators compose in order of ``priority``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
from pydantic import TypeAdapter, ValidationError

from hivesim.dht.storage import DHTRecord
from hivesim.net.identity import Identity, canonical_bytes, verify

_SIGNED = "hivesim-signed"


class RecordRejected(ValueError):
    """A record failed validation; the message says why."""


class RecordValidator:
    """Base class: accepts everything, changes nothing."""

    priority: int = 0

    def validate(self, record: DHTRecord) -> None:
        """Raise :class:`RecordRejected` (with a reason) if the record must not be stored or returned."""

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value


def owner_marker(public_key: bytes) -> str:
    """The text a key or subkey contains to say that only this public key's holder may write it."""
    return f"[owner:{public_key.hex()}]"


_OWNER = re.compile(rb"\[owner:([0-9a-f]{64})\]")


def owners_of(record: DHTRecord) -> set[bytes]:
    """Public keys named by ``[owner:...]`` markers in the record's key and subkey bytes."""
    found = set()
    for part in (record.key, record.subkey or b""):
        if b"[owner:" in part:  # most records name no owner: skip the regular expression
            found.update(bytes.fromhex(m.decode()) for m in _OWNER.findall(part))
    return found


class SignatureValidator(RecordValidator):
    """Keys or subkeys containing ``[owner:<ed25519 public key hex>]`` can only be written by that owner.

    The writer's value is wrapped with an Ed25519 signature over (key, subkey, value, expiration);
    every node checks it on store and every reader on get, so neither an impostor nor a node that
    tampers with a stored value gets its version accepted. Records without a marker pass untouched.

    Args:
        identity: the key pair this peer signs its own records with (a fresh one if omitted).
    """

    priority = 10

    def __init__(self, identity: Identity | None = None) -> None:
        self.identity = identity or Identity()

    @property
    def local_public_key(self) -> bytes:
        return self.identity.public_key

    @property
    def ownership_marker(self) -> str:
        return owner_marker(self.identity.public_key)

    def sign_value(self, record: DHTRecord) -> bytes:
        owners = owners_of(record)
        if not owners:
            return record.value
        if owners != {self.identity.public_key}:
            raise RecordRejected(
                "this key names an owner whose private key this peer does not hold; only "
                f"{', '.join(o.hex()[:16] + '...' for o in owners)} may write it"
            )
        signature = self.identity.sign(_signed_bytes(record, record.value))
        return msgpack.packb([_SIGNED, record.value, signature], use_bin_type=True)

    def validate(self, record: DHTRecord) -> None:
        owners = owners_of(record)
        if not owners:
            return
        if len(owners) > 1:
            raise RecordRejected("a record may name one owner only")
        inner, signature = _unwrap(record)
        (owner,) = owners
        if not verify(owner, _signed_bytes(record, inner), signature):
            raise RecordRejected("the signature does not match the owner named in the key")

    def strip_value(self, record: DHTRecord) -> bytes:
        if not owners_of(record):
            return record.value
        return _unwrap(record)[0]


def _signed_bytes(record: DHTRecord, value: bytes) -> bytes:
    return canonical_bytes([record.key, record.subkey, value, record.expiration_time])


def _unwrap(record: DHTRecord) -> tuple[bytes, bytes]:
    try:
        tag, inner, signature = msgpack.unpackb(record.value, raw=False)
    except Exception:
        raise RecordRejected("the key is owned, but the value carries no signature") from None
    if tag != _SIGNED or not isinstance(inner, bytes) or not isinstance(signature, bytes):
        raise RecordRejected("the key is owned, but the value carries no signature")
    return inner, signature


class SchemaValidator(RecordValidator):
    """Values under keys that start with ``prefix`` must match a pydantic type (a model or any type hint).

    Example: ``SchemaValidator("experts.", dict[str, int])`` or ``SchemaValidator("peers.", PeerInfo)``.
    Applies to string keys only; the value checked is the one the writer passed to ``store``.
    """

    priority = 5  # inside the signature: checks the value the owner signed

    def __init__(self, prefix: str, schema: Any) -> None:
        self.prefix = prefix
        self.adapter = TypeAdapter(schema)
        self.schema = schema

    def validate(self, record: DHTRecord) -> None:
        try:
            key = msgpack.unpackb(record.key, raw=False)
        except Exception:
            return
        if not isinstance(key, str) or not key.startswith(self.prefix):
            return
        value = record.value
        if owners_of(record):
            value = _unwrap(record)[0]
        try:
            self.adapter.validate_python(msgpack.unpackb(value, raw=False), strict=False)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors()[:3])
            raise RecordRejected(f"value under {key!r} does not match the schema for {self.prefix!r}*: {problems}") from None
        except Exception as e:
            raise RecordRejected(f"value under {key!r} is unreadable: {e}") from None


class CompositeValidator(RecordValidator):
    """All validators in order: signing from the innermost (lowest priority) out, checking all."""

    def __init__(self, validators: Iterable[RecordValidator] = ()) -> None:
        self.validators: Sequence[RecordValidator] = sorted(validators, key=lambda v: v.priority)

    def __bool__(self) -> bool:
        return bool(self.validators)

    def sign_value(self, record: DHTRecord) -> bytes:
        value = record.value
        for validator in self.validators:
            value = validator.sign_value(_with_value(record, value))
        return value

    def validate(self, record: DHTRecord) -> None:
        for validator in self.validators:
            validator.validate(record)

    def strip_value(self, record: DHTRecord) -> bytes:
        value = record.value
        for validator in reversed(self.validators):
            value = validator.strip_value(_with_value(record, value))
        return value


def _with_value(record: DHTRecord, value: bytes) -> DHTRecord:
    return DHTRecord(record.key, record.subkey, value, record.expiration_time)
