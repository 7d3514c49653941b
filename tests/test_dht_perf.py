"""What makes the DHT cheap: stores ride on the lookup, latest gets stop at the replicas, no torch."""

import asyncio
import subprocess
import sys
import textwrap

from hivesim.dht import get_dht_time, key_id
from hivesim.dht.protocol import FIND

from dht_swarm import make_swarm, stop_all


def true_nearest(nodes, key, count):
    target = key_id(key)
    return sorted(nodes, key=lambda n: n.node_id ^ target)[:count]


def holders(nodes, key):
    return {n for n in nodes if n.storage.get(key_id(key))}


async def test_a_store_costs_one_request_per_replica_and_lands_on_the_true_nearest():
    # 16 nodes with k=20: every routing table is complete, as in hivemind's benchmark
    nodes = await make_swarm(16, seed=2, num_replicas=5)
    try:
        for i in range(10):
            key, storer = f"key-{i}", nodes[i]
            for _ in range(100):  # callers still being pinged back (routing admission) would count as the store's
                if not any(n._verifying for n in nodes):
                    break
                await asyncio.sleep(0.01)
            before = storer.endpoint.stats["calls_sent"]
            assert await storer.store(key, i, get_dht_time() + 60)
            calls = storer.endpoint.stats["calls_sent"] - before
            # a find to each of the 5 nearest that stores on the way: no second round of store requests
            assert calls <= 5, f"store {i} took {calls} requests"
            assert holders(nodes, key) == set(true_nearest(nodes, key, 5))
        for i in range(10):
            getter = nodes[15 - i]
            before = getter.endpoint.stats["calls_sent"]
            assert (await getter.get(f"key-{i}", latest=True)).value == i
            calls = getter.endpoint.stats["calls_sent"] - before
            assert calls <= 5 + 1, f"latest get {i} took {calls} requests"  # the replicas, 1 spare
    finally:
        await stop_all(nodes)


async def test_a_find_with_records_stores_only_where_the_key_belongs():
    nodes = await make_swarm(16, seed=5, num_replicas=3)
    try:
        asker = nodes[0]
        key_bytes = b"\xa3far"  # msgpack of "far"
        target = key_id("far")
        ranked = sorted(nodes[1:], key=lambda n: n.node_id ^ target)
        record = [key_bytes, None, b"\xa1v", get_dht_time() + 60]
        payload = {"from": asker._me(), "keys": [target.to_bytes(20, "big")], "store": [record], "replicas": 3}
        near_reply = await asker.endpoint.call(ranked[0].address, FIND, payload)
        far_reply = await asker.endpoint.call(ranked[-1].address, FIND, payload)
        assert near_reply["stored"] == [True] and ranked[0].storage.get(target)
        assert far_reply["stored"] == [None] and not ranked[-1].storage.get(target)
    finally:
        await stop_all(nodes)


DHT_ONLY = textwrap.dedent(
    """
    import sys
    from hivesim import DHT, get_dht_time

    first = DHT()
    second = DHT(initial_peers=first.get_visible_addresses())
    assert second.store("k", [1, b"x"], get_dht_time() + 30)
    assert first.get("k", latest=True).value == [1, b"x"]
    second.shutdown()
    first.shutdown()
    print("torch loaded:", "torch" in sys.modules)
    from hivesim import SizeAdaptiveCompression  # the names that need torch still import
    from hivesim.net import CODECS
    print("then:", "torch" in sys.modules, SizeAdaptiveCompression.__name__, sorted(CODECS)[0])
    """
)


def test_a_dht_only_process_never_imports_torch():
    out = subprocess.run([sys.executable, "-c", DHT_ONLY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch loaded: False" in out.stdout
    assert "then: True SizeAdaptiveCompression" in out.stdout
