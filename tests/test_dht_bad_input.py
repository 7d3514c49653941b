"""Hostile RPCs against a DHT node: rejected with errors; the node keeps serving with bounded memory."""

import pytest

from hivesim.dht import DHTNode, Limits, get_dht_time
from hivesim.dht.protocol import FIND, PING, STORE
from hivesim.net import Endpoint, RemoteError

from dht_swarm import make_swarm, stop_all


@pytest.fixture
async def target():
    nodes = await make_swarm(4, seed=9, max_storage_bytes=2 << 20, limits=Limits(max_value_bytes=64 << 10))
    attacker = await Endpoint().start()
    yield nodes, attacker
    await attacker.close()
    await stop_all(nodes)


async def healthy(nodes):
    now = get_dht_time()
    assert await nodes[1].store("health", "ok", now + 30)
    assert (await nodes[2].get("health")).value == "ok"


@pytest.mark.parametrize(
    "method, payload, reason",
    [
        (PING, "not a map", "map"),
        (PING, {"from": [b"short", "tcp://127.0.0.1:1"]}, "20 bytes"),
        (PING, {"from": [b"x" * 20, "http://evil"]}, "tcp://"),
        (FIND, {"from": None, "keys": [b"abc"]}, "20 bytes"),
        (FIND, {"from": None, "keys": "abc"}, "list"),
        (FIND, {"from": None, "keys": [b"x" * 20] * 5000}, "at most"),
        (STORE, {"from": None, "records": [[b"k", None, b"v"]]}, "[key, subkey, value, expiration]"),
        (STORE, {"from": None, "records": [[b"k" * 5000, None, b"v", 1e10]]}, "key must be"),
        (STORE, {"from": None, "records": [[b"k", None, b"v" * (65 << 10), 1e10]]}, "value must be"),
        (STORE, {"from": None, "records": [[b"k", None, b"v", "tomorrow"]]}, "expiration"),
        (STORE, {"from": None, "records": [[b"k", None, b"v", float("nan")]]}, "finite"),
        (STORE, {"from": None, "records": [[b"k", 7, b"v", 1e10]]}, "subkey"),
        (FIND, {"from": None, "keys": [b"x" * 20], "n": 0}, "'n' must be"),
        (FIND, {"from": None, "keys": [b"x" * 20], "n": "all"}, "'n' must be"),
        (FIND, {"from": None, "keys": [b"x" * 20], "store": [[b"k", None, b"v", 1e10]]}, "'replicas'"),
        (FIND, {"from": None, "keys": [b"x" * 20], "store": [[b"k", None, b"v", 1e10]], "replicas": -3}, "'replicas'"),
        (FIND, {"from": None, "keys": [b"x" * 20], "store": "records", "replicas": 2}, "list"),
        (FIND, {"from": None, "keys": [b"x" * 20], "store": [[b"k", None, b"v" * (65 << 10), 1e10]], "replicas": 2},
         "value must be"),
    ],
)
async def test_malformed_requests_are_rejected(target, method, payload, reason):
    nodes, attacker = target
    with pytest.raises(RemoteError) as info:
        await attacker.call(nodes[0].address, method, payload)
    assert reason in str(info.value)
    await healthy(nodes)


async def test_a_flood_of_stores_keeps_memory_bounded(target):
    nodes, attacker = target
    victim = nodes[0]
    far_future = get_dht_time() + 3600
    for batch in range(20):
        records = [[f"junk-{batch}-{i}".encode(), None, b"x" * 8000, far_future + i] for i in range(100)]
        reply = await attacker.call(victim.address, STORE, {"from": None, "records": records})
        assert len(reply["ok"]) == 100
    # 16 MB were offered; the node keeps at most its budget, evicting what expires soonest
    assert victim.storage.nbytes <= victim.storage.max_bytes
    assert victim.storage.records < 20 * 100
    await healthy(nodes)


async def test_lies_in_find_replies_do_not_break_lookups(target):
    nodes, attacker = target

    def liar(payload, ctx):
        return {"from": None, "found": "garbage"}

    attacker.register(FIND, liar)
    attacker.register(PING, lambda payload, ctx: {"from": [b"\x01" * 20, attacker.address]})
    nodes[0].routing.add_or_update(int.from_bytes(b"\x01" * 20, "big"), attacker.address)
    await healthy(nodes)
    assert (await nodes[0].get("health")).value == "ok"
