"""The blocking ``DHT`` facade, used the way hivemind scripts use hivemind.DHT."""

import threading
from concurrent.futures import Future

import pytest

import hivesim
from hivesim import DHT, get_dht_time


def test_facade_store_get_and_coroutines():
    threads_before = threading.active_count()
    with DHT() as first:
        with DHT(initial_peers=first.get_visible_addresses()) as second, DHT(initial_peers=second.get_visible_addresses()) as third:
            assert first.get_visible_addresses()[0].startswith("tcp://127.0.0.1:")
            assert len(second.peer_id) == 20 and second.peer_id != first.peer_id
            now = get_dht_time()
            assert first.store("model", {"step": 3}, now + 60)
            assert third.get("model").value == {"step": 3}
            assert second.store("peers", "me", now + 60, subkey="second")
            future = third.store("peers", "me", now + 60, subkey="third", return_future=True)
            assert isinstance(future, Future) and future.result(10)
            found = first.get("peers", latest=True)
            assert set(found.value) == {"second", "third"}

            async def count_contacts(dht, node):
                return len(node.routing)

            assert second.run_coroutine(count_contacts) == 2
            assert third.get_many(["model", "nope"])["nope"] is None
        assert not second.is_alive
    assert threading.active_count() <= threads_before  # every node thread has ended


def test_unreachable_initial_peers_raise_a_clear_error():
    with pytest.raises(ConnectionError, match="none of the initial peers"):
        DHT(initial_peers=["tcp://127.0.0.1:1"], rpc_timeout=1.0)


def test_public_api_is_importable_from_the_package():
    for name in ("DHT", "DHTNode", "get_dht_time", "SignatureValidator", "SchemaValidator", "owner_marker"):
        assert hasattr(hivesim, name)
