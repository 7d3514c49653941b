import asyncio
import random

import pytest

from hivesim.dht import DHTNode
from hivesim.dht.routing import MAX_ID, RoutingTable

from dht_swarm import make_swarm, stop_all


def test_buckets_split_around_own_id_and_keep_k():
    rng = random.Random(0)
    me = rng.randrange(MAX_ID)
    table = RoutingTable(me, bucket_size=4, depth_modulo=5)
    ids = [rng.randrange(MAX_ID) for _ in range(500)]
    for i, node_id in enumerate(ids):
        table.add_or_update(node_id, f"tcp://127.0.0.1:{1000 + i}")
    assert all(len(b.nodes) <= 4 for b in table.buckets)
    assert len(table.buckets) > 1
    assert table.bucket_for(me).covers(me)
    # the buckets tile the id space without gaps
    assert table.buckets[0].low == 0 and table.buckets[-1].high == MAX_ID
    assert all(a.high == b.low for a, b in zip(table.buckets, table.buckets[1:]))
    # the nearest contacts we know are exactly the nearest of all we kept
    target = rng.randrange(MAX_ID)
    kept = [nid for b in table.buckets for nid in b.nodes]
    assert [nid for nid, _ in table.nearest(target, 5)] == sorted(kept, key=lambda n: n ^ target)[:5]


def test_dead_contacts_are_replaced_and_blacklisted():
    table = RoutingTable(0, bucket_size=2, depth_modulo=1, max_failures=2, backoff=10.0)
    far = [MAX_ID - 1, MAX_ID - 2, MAX_ID - 3]  # all in the far bucket, which may not split
    table.add_or_update(1, "tcp://a:1")
    for i, node_id in enumerate(far):
        lru = table.add_or_update(node_id, f"tcp://far:{i}")
    assert lru == far[0]  # full bucket: the oldest contact is the one to check
    assert far[2] not in table
    assert not table.mark_failed(far[0])  # one failure: kept but banned for a while
    assert table.is_banned(far[0])
    assert [n for n, _ in table.nearest(MAX_ID - 1, 3)][-1] == far[0]  # banned contacts come last
    assert table.mark_failed(far[0])  # second failure: dropped, replaced by the waiting newcomer
    assert far[0] not in table and far[2] in table
    table.add_or_update(far[0], "tcp://far:0")  # a contact that answers again is forgiven
    assert not table.is_banned(far[0])


async def test_lookup_finds_the_true_nearest_nodes_in_a_swarm_of_50():
    nodes = await make_swarm(50, seed=1, bucket_size=8)
    try:
        rng = random.Random(2)
        all_ids = {n.node_id for n in nodes}
        for _ in range(10):
            searcher = rng.choice(nodes)
            target = rng.randrange(MAX_ID)
            lookup = (await searcher.find_nearest([target]))[target]
            truth = sorted(all_ids - {searcher.node_id}, key=lambda n: n ^ target)[:8]
            assert [nid for nid, _ in lookup.nearest_answered()] == truth
    finally:
        await stop_all(nodes)


def test_a_full_bucket_asks_for_its_oldest_contact_to_be_checked_at_most_once_per_probe_interval():
    table = RoutingTable(0, bucket_size=2, depth_modulo=1, probe_interval=60.0)
    far = [MAX_ID - 1 - i for i in range(6)]  # one far bucket that may not split
    table.add_or_update(1, "tcp://a:1")
    table.add_or_update(far[0], "tcp://far:0")
    table.add_or_update(far[1], "tcp://far:1")
    assert not table.has_room(far[2]) and table.has_room(far[0]) and table.has_room(2)  # 2 would split ours
    assert table.add_or_update(far[2], "tcp://far:2") == far[0]  # the first newcomer: check the oldest
    assert table.add_or_update(far[3], "tcp://far:3") is None  # the next ones, within the interval: no ping
    assert table.add_or_update(far[4], "tcp://far:4") is None
    assert table.waiting_at(far[3]) == "tcp://far:3" and table.waiting_at(far[0]) is None
    table.bucket_for(far[0]).last_probed -= 61  # the interval has passed
    assert table.add_or_update(far[5], "tcp://far:5") == far[0]


async def test_a_caller_that_could_only_wait_in_a_full_bucket_is_not_pinged_back():
    """A node pings a new caller back before it enters the table (proof that it answers where it claims);
    in a large swarm most callers fall in full buckets, and a ping for each would add a connection to most
    requests. Only callers with room are pinged back (the control shows the ping-back happens)."""
    node = await DHTNode.create(bucket_size=2, depth_modulo=1)
    callers = []
    try:
        top = node.node_id >> 159
        far, near = [], []
        for _ in range(40):  # bounded: each new node lands in either half with probability 1/2
            if far and near:
                break
            caller = await DHTNode.create()
            callers.append(caller)
            (far if caller.node_id >> 159 != top else near).append(caller)
        assert far and near, "no caller in each half of the id space"
        # fill the far half's bucket with two (fake) contacts and split the table once
        base = (1 - top) << 159
        node.routing.add_or_update(base + 1, "tcp://127.0.0.1:1")
        node.routing.add_or_update(base + 2, "tcp://127.0.0.1:2")
        node.routing.add_or_update((top << 159) + 3, "tcp://127.0.0.1:3")
        assert not node.routing.has_room(far[0].node_id) and node.routing.has_room(near[0].node_id)
        for caller in (far[0], near[0]):
            assert await caller.ping(node.address) == node.node_id
        for _ in range(100):  # the control's ping-back arrives within a few seconds at most
            if near[0].endpoint.stats["calls_served"] >= 1:
                break
            await asyncio.sleep(0.05)
        assert near[0].endpoint.stats["calls_served"] >= 1  # the caller with room was pinged back
        assert far[0].endpoint.stats["calls_served"] == 0  # the one without was not
    finally:
        await stop_all([node, *callers])
