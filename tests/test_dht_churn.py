"""A third of the swarm dies at once; the data survives."""

import asyncio
import random

from hivesim.dht import DHTNode, get_dht_time

from dht_swarm import make_swarm, stop_all


async def test_a_third_of_64_nodes_die_and_99_percent_of_keys_are_still_found():
    nodes = await make_swarm(64, seed=7, rpc_timeout=2.0)
    extra: list[DHTNode] = []
    try:
        rng = random.Random(8)
        now = get_dht_time()
        keys = [f"key-{i}" for i in range(200)]
        writers = [rng.choice(nodes) for _ in keys]
        stored = await asyncio.gather(*(w.store(k, i, now + 300) for i, (w, k) in enumerate(zip(writers, keys))))
        assert all(stored)

        victims = rng.sample(nodes, len(nodes) // 3)
        await stop_all(victims)  # abrupt: sockets close, no goodbye
        survivors = [n for n in nodes if n not in victims]

        reader = rng.choice(survivors)
        found = await reader.get_many(keys)
        hits = sum(found[k] is not None and found[k].value == i for i, k in enumerate(keys))
        assert hits >= 0.99 * len(keys), f"only {hits}/{len(keys)} keys found after the failures"

        # newcomers joining after the failures see the values too
        for _ in range(4):
            extra.append(await DHTNode.create([rng.choice(survivors).address], rpc_timeout=2.0))
        found = await extra[-1].get_many(keys)
        hits = sum(found[k] is not None for k in keys)
        assert hits >= 0.99 * len(keys), f"a newcomer found only {hits}/{len(keys)} keys"
        # dead contacts were noticed and dropped or banned, not kept as healthy
        dead = {v.node_id for v in victims}
        healthy = [nid for b in reader.routing.buckets for nid in b.nodes if nid in dead and not reader.routing.is_banned(nid)]
        assert len(healthy) < len(dead)
    finally:
        await stop_all(nodes + extra)
