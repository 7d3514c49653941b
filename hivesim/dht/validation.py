"""Record validators: who may write a key, and what its value may look like.

A validator sees every record a node stores and every record a lookup returns. ``sign_value`` runs on
the writer before a record leaves; ``validate`` runs on every node that stores it and on every reader;
``strip_value`` undoes ``sign_value`` for the reader. Validators compose in order of ``priority``.

Validators can be copied to another process of the same user (a ``DHT`` handed to a worker takes its
validators along, as hivemind's do): a :class:`SignatureValidator` carries its private key as raw bytes in
the copy, so treat such a copy as the key itself. Nothing here decodes what a peer sends that way: records
travel as msgpack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

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


def owner_of_subkey(subkey: Any) -> bytes | None:
    """The public key a subkey that is exactly an owner marker names, or None for a subkey nobody owns."""
    if not isinstance(subkey, str) or not subkey.startswith("[owner:") or not subkey.endswith("]"):
        return None
    try:
        key = bytes.fromhex(subkey[len("[owner:"):-1])
    except ValueError:
        return None
    return key if len(key) == 32 else None


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

    def __getstate__(self) -> dict[str, Any]:
        return {"private_key": self.identity.private_bytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.identity = Identity.from_private_bytes(state["private_key"])

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
    """What values the DHT accepts, checked by every node that stores a record and by every reader.

    Two forms:

    * hivemind's, **one key per field**: ``SchemaValidator(Model, prefix="run", allow_extra_keys=True)`` with
      a pydantic model. The key ``"{prefix}_{field}"`` (``"{field}"`` without a prefix; a field's alias if it
      has one) holds a value of that field's type; for a dict-typed field each subkey is one entry
      (``{subkey: value}`` is checked). A value pydantic would have to convert (``"3"`` for ``int``) is
      rejected, as hivemind does; use strict number types (``StrictInt``) where ``3.0`` must not pass for 3.
      ``allow_extra_keys=False`` rejects every key that is not a field (use it with a single validator).
    * hivesim's, **a key prefix**: ``SchemaValidator("experts.", ExpertInfo)``: every string key starting with
      ``"experts."`` holds a value of that type (a model or any type hint), converted values allowed.

    The value checked is the one the writer passed to ``store`` (inside an owner's signature).
    """

    priority = 5  # inside the signature: checks the value the owner signed

    def __init__(self, schema: Any, type_: Any = None, *, prefix: str | None = None, allow_extra_keys: bool = True) -> None:
        if isinstance(schema, str):  # SchemaValidator("experts.", ExpertInfo): a key prefix and a type
            if type_ is None or prefix is not None:
                raise TypeError("SchemaValidator(key_prefix, type) or SchemaValidator(Model, prefix=...)")
            self._state = {"mode": "prefix", "prefix": schema, "schema": type_}
        else:
            if not (isinstance(schema, type) and issubclass(schema, BaseModel)) or type_ is not None:
                raise TypeError(f"SchemaValidator(Model, prefix=...) takes a pydantic model class, got {schema!r}")
            if prefix is not None and (not isinstance(prefix, str) or not prefix):
                raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
            self._state = {"mode": "fields", "prefix": prefix, "schema": schema, "allow_extra_keys": allow_extra_keys}
        self._build()

    def _build(self) -> None:
        state = self._state
        self.schema = state["schema"]
        self.prefix = state["prefix"]
        self.allow_extra_keys = state.get("allow_extra_keys", True)
        self.adapter: TypeAdapter | None = None
        self.fields: dict[str, tuple[str, TypeAdapter]] = {}  # DHT key -> (field name, its adapter)
        if state["mode"] == "prefix":
            self.adapter = TypeAdapter(self.schema)
            return
        for name, info in self.schema.model_fields.items():
            key = info.alias or name
            if self.prefix is not None:
                key = f"{self.prefix}_{key}"
            hint = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            self.fields[key] = (name, TypeAdapter(hint))

    def __getstate__(self) -> dict[str, Any]:
        return dict(self._state)  # adapters are rebuilt: TypeAdapter objects cannot be copied that way

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._state = dict(state)
        self._build()

    def validate(self, record: DHTRecord) -> None:
        try:
            key = msgpack.unpackb(record.key, raw=False)
        except Exception:
            return
        if self.adapter is None:
            self._validate_field(key, record)
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

    def _validate_field(self, key: Any, record: DHTRecord) -> None:
        field = self.fields.get(key) if isinstance(key, str) else None
        if field is None:
            if not self.allow_extra_keys:
                raise RecordRejected(f"key {key!r} is not a field of {self.schema.__name__} (allow_extra_keys=False)")
            return
        name, adapter = field
        raw = _unwrap(record)[0] if owners_of(record) else record.value
        try:
            value = msgpack.unpackb(raw, raw=False)
            if record.subkey is not None:
                value = {msgpack.unpackb(record.subkey, raw=False): value}
        except Exception as e:
            raise RecordRejected(f"value under {key!r} is unreadable: {e}") from None
        try:
            parsed = adapter.validate_python(value)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}" for err in e.errors()[:3])
            raise RecordRejected(f"value under {key!r} does not match {self.schema.__name__}.{name}: {problems}") from None
        if _plain(adapter.dump_python(parsed)) != _plain(value):
            raise RecordRejected(f"value under {key!r} would have to be converted to match {self.schema.__name__}.{name} "
                                 f"(got {value!r}); store it as the field's type")


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: msgpack brings every sequence back as a list."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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
