import os

import pytest

from hivesim.net import Identity, canonical_bytes, peer_id_from_public_key, verify, verify_record


def test_peer_id_comes_from_the_public_key():
    identity = Identity()
    assert len(identity.public_key) == 32 and len(identity.peer_id) == 20
    assert identity.peer_id == peer_id_from_public_key(identity.public_key)
    assert Identity().peer_id != identity.peer_id


def test_sign_and_verify_records():
    alice, mallory = Identity(), Identity()
    record = {"key": "experts", "value": [1, 2, b"x"], "expiration": 123.5}
    signature = alice.sign_record(record)
    assert verify_record(alice.public_key, record, signature)
    assert not verify_record(mallory.public_key, record, signature)
    tampered = dict(record, value=[1, 2, b"y"])
    assert not verify_record(alice.public_key, tampered, signature)
    assert not verify(alice.public_key, b"data", b"\x00" * 64)
    assert not verify(b"short", b"data", signature)  # malformed key: False, not an exception


def test_canonical_encoding_ignores_key_order():
    a = {"b": 1, "a": {"y": 2, "x": [3, {"q": 1, "p": 2}]}}
    b = {"a": {"x": [3, {"p": 2, "q": 1}], "y": 2}, "b": 1}
    assert canonical_bytes(a) == canonical_bytes(b)
    assert Identity().sign_record(a)  # signable


def test_identity_persists_on_disk(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    first = Identity.load_or_create(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    again = Identity.load_or_create(path)
    assert again.peer_id == first.peer_id
    (tmp_path / "bad.key").write_bytes(b"123")
    with pytest.raises(ValueError, match="32-byte"):
        Identity.load_or_create(tmp_path / "bad.key")
