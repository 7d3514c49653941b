"""Value semantics of the DHT, on real nodes over loopback (hivemind's semantics)."""

import asyncio

import pytest
from pydantic import BaseModel

from hivesim.dht import DHTNode, SchemaValidator, SignatureValidator, get_dht_time, key_id, owner_marker
from hivesim.dht.storage import DHTRecord
from hivesim.net import Identity

from dht_swarm import make_swarm, stop_all


@pytest.fixture
async def swarm():
    nodes = await make_swarm(12, seed=3, bucket_size=6)
    yield nodes
    await stop_all(nodes)


def holders(nodes, key):
    target = key_id(key)
    return [n for n in nodes if n.storage.get(target)]


async def test_store_get_and_replication(swarm):
    now = get_dht_time()
    assert await swarm[0].store("alpha", {"x": [1, 2, b"bytes"]}, now + 60)
    found = await swarm[7].get("alpha")
    assert found.value == {"x": [1, 2, b"bytes"]} and found.expiration_time == pytest.approx(now + 60)
    value, expiration = found  # unpacks like hivemind's
    assert len(holders(swarm, "alpha")) == 6  # num_replicas defaults to bucket_size
    assert await swarm[3].get("never-stored") is None


async def test_newest_expiration_wins(swarm):
    now = get_dht_time()
    assert await swarm[0].store("k", "new", now + 100)
    assert not await swarm[1].store("k", "old", now + 50)  # older than what is held: refused everywhere
    assert (await swarm[2].get("k")).value == "new"
    assert await swarm[4].store("k", "newer", now + 200)
    assert (await swarm[5].get("k", latest=True)).value == "newer"


async def test_expired_values_are_never_returned(swarm):
    now = get_dht_time()
    assert not await swarm[0].store("past", 1, now - 1)
    assert await swarm[0].store("soon", 1, now + 0.5)
    assert (await swarm[6].get("soon")).value == 1
    await asyncio.sleep(0.7)
    assert await swarm[6].get("soon") is None
    assert all(not n.storage.get(key_id("soon")) for n in swarm)


async def test_subkeys_each_with_own_expiration(swarm):
    now = get_dht_time()
    results = await asyncio.gather(*(swarm[i].store("group", f"peer{i}", now + 30 + i, subkey=f"s{i}") for i in range(6)))
    assert all(results)
    assert not await swarm[9].store("group", "stale", now + 1, subkey="s3")  # older than s3's
    found = await swarm[10].get("group", latest=True)
    assert set(found.value) == {f"s{i}" for i in range(6)}
    assert found.value["s3"].value == "peer3" and found.value["s3"].expiration_time == pytest.approx(now + 33)
    assert found.expiration_time == pytest.approx(now + 35)
    # a plain value that outlives every subkey replaces the dictionary; an older one does not
    assert not await swarm[0].store("group", "plain", now + 20)
    assert await swarm[0].store("group", "plain", now + 100)
    assert (await swarm[11].get("group", latest=True)).value == "plain"


async def test_latest_finds_the_newest_among_replicas(swarm):
    now = get_dht_time()
    assert await swarm[0].store("versioned", "v1", now + 10)
    # a newer version lands on one replica only (as if the other stores had been lost)
    target_node = holders(swarm, "versioned")[-1]
    newest = DHTRecord(*target_node.storage.get(key_id("versioned"))[0].to_wire()[:2], b"\xa2v2", now + 50)
    assert target_node.storage.store(key_id("versioned"), newest)
    assert (await swarm[5].get("versioned", latest=True)).value == "v2"


async def test_bulk_operations_share_lookups(swarm):
    now = get_dht_time()
    items = [(f"key{i}", i, now + 60) for i in range(40)] + [("dict", "a", now + 60, "sub")]
    before = swarm[1].endpoint.stats["calls_sent"]
    outcome = await swarm[1].store_many(items)
    assert all(outcome.values()) and len(outcome) == 41 and outcome[("dict", "sub")]
    bulk_calls = swarm[1].endpoint.stats["calls_sent"] - before
    assert bulk_calls < 41 * 3  # one walk served many keys: far fewer calls than a lookup per key
    got = await swarm[8].get_many([f"key{i}" for i in range(40)] + ["missing"])
    assert [got[f"key{i}"].value for i in range(40)] == list(range(40)) and got["missing"] is None


async def test_a_latest_get_repairs_the_replicas_that_lacked_the_value():
    nodes = await make_swarm(12, seed=4, bucket_size=4, num_replicas=1)
    getter = None
    try:
        now = get_dht_time()
        assert await nodes[0].store("cached", "x", now + 60)
        assert len(holders(nodes, "cached")) == 1
        # the getter expects two replicas where the storer made one: the second nearest lacks the value
        getter = await DHTNode.create([nodes[0].address], bucket_size=4, num_replicas=2)
        assert (await getter.get("cached", latest=True)).value == "x"
        for _ in range(50):
            if len(holders(nodes + [getter], "cached")) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(holders(nodes + [getter], "cached")) == 2
    finally:
        await stop_all([*nodes, getter] if getter else nodes)


async def test_owned_keys_need_the_owners_signature(swarm):
    owner, impostor = swarm[0], swarm[1]
    key = f"profile{owner_marker(owner.public_key)}"
    now = get_dht_time()
    assert await owner.store(key, "mine", now + 60)
    assert (await swarm[5].get(key)).value == "mine"
    # another peer cannot sign for that key: refused locally, with the reason
    with pytest.raises(ValueError, match="does not hold"):
        await impostor.store(key, "stolen", now + 120)
    # nor can it slip an unsigned or re-signed value past the nodes that store it
    forged = DHTRecord(b"\xd9" + bytes([len(key)]) + key.encode(), None, b"\xa6stolen", now + 120)
    for node in swarm:
        assert isinstance(node._store_local(forged), str)  # rejected, with a reason
    # a node that tampers with its own copy is caught by readers
    target = key_id(key)
    for node in holders(swarm, key):
        record = node.storage.get(target)[0]
        node.storage._entries.clear()
        node.storage.store(target, DHTRecord(record.key, None, record.value.replace(b"mine", b"evil"), record.expiration_time + 1))
    assert await swarm[7].get(key, latest=True) is None
    # owned subkeys work the same way: each peer may write its own entry of a shared key
    for node in swarm[:4]:
        assert await node.store("roster", node.address, now + 60, subkey=owner_marker(node.public_key))
    roster = (await swarm[9].get("roster", latest=True)).value
    assert len(roster) == 4


class ExpertInfo(BaseModel):
    address: str
    load: int


async def test_schema_validation_for_a_key_prefix():
    validator = SchemaValidator("experts.", ExpertInfo)
    nodes = await make_swarm(6, seed=5, bucket_size=4, record_validators=[validator])
    try:
        now = get_dht_time()
        assert await nodes[0].store("experts.ffn.0", {"address": "tcp://x:1", "load": 3}, now + 60)
        assert not await nodes[0].store("experts.ffn.1", {"address": "tcp://x:1", "load": "lots"}, now + 60)
        assert await nodes[0].store("other", {"anything": "goes"}, now + 60)
        assert await nodes[3].get("experts.ffn.1") is None
        bad = DHTRecord(b"\xadexperts.ffn.2", None, b"\x81\xa4load\x01", now + 60)
        reason = nodes[2]._store_local(bad)
        assert isinstance(reason, str) and "address" in reason and "schema" in reason
    finally:
        await stop_all(nodes)


async def test_client_mode_nodes_ask_but_are_never_routed_to(swarm):
    client = await DHTNode.create([swarm[0].address], client_mode=True)
    try:
        now = get_dht_time()
        assert await client.store("from-client", 42, now + 60)
        assert (await swarm[4].get("from-client")).value == 42
        assert (await client.get("from-client")).value == 42
        assert all(client.node_id not in n.routing for n in swarm)
        assert not client.storage.get(key_id("from-client"))
    finally:
        await client.shutdown()


async def test_bootstrap_from_dead_peers_fails_clearly():
    with pytest.raises(ConnectionError, match="none of the initial peers"):
        await DHTNode.create(["tcp://127.0.0.1:1"], rpc_timeout=1.0)
    lonely = await DHTNode.create(["tcp://127.0.0.1:1"], ensure_bootstrap_success=False, rpc_timeout=1.0)
    assert await lonely.store("solo", 1, get_dht_time() + 10)  # a swarm of one stores locally
    assert (await lonely.get("solo")).value == 1
    await lonely.shutdown()
