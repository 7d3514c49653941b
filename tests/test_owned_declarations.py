"""The records hivesim relies on are owned by their writer: a squatter on the DHT (a real node on
loopback) cannot take over an expert's cell or slip a matchmaking declaration past honest peers."""

from __future__ import annotations

import numpy as np
import pytest

from hivesim.averaging.matchmaking import LOOKING, BanList, Matchmaker, _Search
from hivesim.dht import DHTNode, get_dht_time, owner_marker
from hivesim.dht.protocol import STORE
from hivesim.moe.beam_search import MoEBeamSearcher
from hivesim.moe.uids import declaration_items, read_declarations

from dht_swarm import make_swarm, stop_all


@pytest.fixture
async def swarm():
    nodes = await make_swarm(6, seed=21, bucket_size=6)
    yield nodes
    await stop_all(nodes)


def scores_for(grid, cell):
    """One sample's scores that rank ``cell`` first."""
    return [np.eye(size)[[coord]] for size, coord in zip(grid, cell)]


async def test_a_squatter_cannot_take_over_an_experts_cell(swarm):
    honest, other, squatter, reader = swarm[1], swarm[4], swarm[5], swarm[3]
    grid = (8, 32)
    now = get_dht_time()
    declared = {"ffn.3.14": honest.address, "ffn.3.15": honest.address}
    assert all((await honest.store_many(declaration_items(declared, now + 60, owner=honest.public_key))).values())
    searcher = MoEBeamSearcher(reader, "ffn", grid, cache_ttl=0.0, negative_ttl=0.0)
    [[found]] = await searcher.find_best_experts(scores_for(grid, (3, 14)), 1)
    assert (found.uid, found.address) == ("ffn.3.14", honest.address)

    # 1. unowned declarations of the same cells (the old format), pointing at the squatter, expiring later
    unowned = declaration_items({"ffn.3.14": squatter.address}, now + 600)
    assert all((await squatter.store_many(unowned)).values())  # the DHT keeps them; readers ignore them
    # 2. a plain value over the prefix key, to wipe the honest server's subkeys
    assert not await squatter.store("ffn.3.", "gone", now + 600)
    # 3. a declaration in the honest server's name: the squatter cannot sign it, and nodes refuse a forgery
    forged_subkey = f"14[owner:{honest.public_key.hex()}]"
    with pytest.raises(ValueError):
        await squatter.store("ffn.3.", squatter.address, now + 600, subkey=forged_subkey)
    import msgpack

    forged = [msgpack.packb("ffn.3."), msgpack.packb(forged_subkey), msgpack.packb(squatter.address), now + 600]
    for node in swarm[:5]:
        reply = await squatter.endpoint.call(node.address, STORE, {"from": None, "records": [forged]})
        assert reply["ok"] != [True]
    # 4. its own, owned declaration redirecting the cell to another peer's server
    redirect = declaration_items({"ffn.3.14": other.address}, now + 600, owner=squatter.public_key)
    assert all((await squatter.store_many(redirect)).values())

    entry = await reader.get("ffn.3.", latest=True)
    assert read_declarations(entry.value, get_dht_time()) == {14: honest.address, 15: honest.address}
    [[found]] = await searcher.find_best_experts(scores_for(grid, (3, 14)), 1)
    assert found.address == honest.address

    # 5. its own owned declaration of the cell, pointing at its own server: a competing server. A reader
    # that already knew the cell keeps its owner; one told whom to trust ignores everyone else.
    compete = declaration_items({"ffn.3.14": squatter.address}, now + 700, owner=squatter.public_key)
    assert all((await squatter.store_many(compete)).values())
    [[found]] = await searcher.find_best_experts(scores_for(grid, (3, 14)), 1)
    assert found.address == honest.address
    trusting = MoEBeamSearcher(reader, "ffn", grid, cache_ttl=0.0, allowed_owners=[honest.public_key])
    [[found]] = await trusting.find_best_experts(scores_for(grid, (3, 14)), 1)
    assert found.address == honest.address
    # the honest server can still re-declare (and move) its cell
    moved = declaration_items({"ffn.3.14": honest.address}, get_dht_time() + 120, owner=honest.public_key)
    assert all((await honest.store_many(moved)).values())


async def test_matchmaking_ignores_declarations_not_made_by_their_peer(swarm):
    me_node, peer_node, squatter, bystander = swarm[0], swarm[1], swarm[2], swarm[3]
    key = "owned_test.0b"
    deadline = get_dht_time() + 30

    def matchmaker(node: DHTNode) -> Matchmaker:
        return Matchmaker(node.endpoint, node, "mm", target_group_size=4, min_group_size=2, client_mode=False,
                          bans=BanList(5.0))

    def search(node: DHTNode) -> _Search:
        me = {"id": node.peer_id, "addr": node.address, "bw": 1.0}
        return _Search(key, deadline, (deadline, me["id"]), me)

    # an honest peer declares itself (owned by its key)
    await matchmaker(peer_node)._publish(search(peer_node), key, LOOKING)
    squat_marker = owner_marker(squatter.public_key).encode()
    # 1. an unowned declaration for a made-up peer
    assert await squatter.store(key, [deadline, squatter.address, False, b"made-up-peer", LOOKING], deadline,
                                subkey=b"made-up-peer" + b"t" * 12)
    # 2. a declaration in the honest peer's name, owned (signed) by the squatter
    assert await squatter.store(key, [deadline, squatter.address, False, peer_node.peer_id, LOOKING], deadline,
                                subkey=peer_node.peer_id + b"u" * 12 + squat_marker)
    # 3. the squatter's own declaration, pointing joiners at a bystander's address
    assert await squatter.store(key, [deadline, bystander.address, False, squatter.peer_id, LOOKING], deadline,
                                subkey=squatter.peer_id + b"v" * 12 + squat_marker)
    # 4. the honest peer's own subkey cannot be written by anyone else
    with pytest.raises(ValueError):
        await squatter.store(key, [deadline, squatter.address, False, peer_node.peer_id, LOOKING], deadline,
                             subkey=peer_node.peer_id + b"w" * 12 + owner_marker(peer_node.public_key).encode())
    declared = await matchmaker(me_node)._declared(search(me_node))
    assert [(d["id"], d["addr"]) for d in declared] == [(peer_node.peer_id, peer_node.address)]
