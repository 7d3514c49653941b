"""hivemind's API shapes on hivesim (issue 16): what a hivemind script calls works here, on real sockets."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
from pydantic import BaseModel, StrictInt

from hivesim import DHT
from hivesim.moe.uids import expand_pattern, parse_uid


# ---------------------------------------------------------------- expert uids


@pytest.mark.parametrize("uid", ["expert.1\n", "expert.01", "expert.1.007", "expert.\u0661", "expert.1 ", " expert.1",
                                 "expert.", "expert", "expert..1", "expert.-1", "expert.1e3", 5, b"expert.1"])
def test_uid_parsing_rejects_a_second_name_for_an_expert(uid):
    with pytest.raises(ValueError, match="expert uid"):
        parse_uid(uid)  # type: ignore[arg-type]


def test_uid_parsing_accepts_canonical_uids_and_patterns_follow_it():
    assert parse_uid("expert.1") == ("expert", (1,))
    assert parse_uid("ffn_0.0.10.3") == ("ffn_0", (0, 10, 3))
    assert expand_pattern("ffn.[0:2].3") == ["ffn.0.3", "ffn.1.3"]
    for bad in ("ffn.03", "ffn.[0:2].\u0661", "ffn.[00:2]"):
        with pytest.raises(ValueError):
            expand_pattern(bad)


# ---------------------------------------------------------------- DHT(initial_peers=...)


def test_initial_peers_may_be_one_address_string():
    with DHT() as first:
        (address,) = first.get_visible_maddrs()
        with DHT(initial_peers=address) as second:  # hivemind scripts pass a str as often as a list
            assert second.initial_peers == [address]
            assert second.store("k", 1, time.time() + 60) and first.get("k").value == 1


@pytest.mark.parametrize("bad, error, words", [
    ([5], TypeError, "initial_peers[0] is 5 (int)"),
    (["tcp://127.0.0.1:1", None], TypeError, "initial_peers[1] is None"),
    (5, TypeError, "initial_peers must be an address or a list of addresses, got 5 (int)"),
    (b"tcp://127.0.0.1:1", TypeError, "bytes"),
    ([""], ValueError, "initial_peers[0] is an empty string"),
    (["tcp://127.0.0.1:1\n"], ValueError, "whitespace"),
])
def test_bad_initial_peers_are_named(bad, error, words):
    with pytest.raises(error) as info:
        DHT(initial_peers=bad)
    assert words in str(info.value)


# ---------------------------------------------------------------- DecentralizedAverager


def test_averager_without_a_target_group_size_and_hivemind_failures():
    """``target_group_size=None`` is hivemind's default (a TypeError here before); a step that did not
    average raises hivemind's AllreduceException unless asked to return None."""
    import torch

    from hivesim import AllreduceException, DecentralizedAverager

    dhts = [DHT()]
    dhts.append(DHT(initial_peers=dhts[0].get_visible_maddrs()))
    averagers = []
    try:
        averagers = [DecentralizedAverager([torch.full((3,), v)], dht, prefix="nolimit", matchmaking_time=2.0)
                     for dht, v in zip(dhts, (1.0, 3.0))]
        results: list = [None, None]

        def work(i: int) -> None:
            results[i] = averagers[i].step(timeout=20)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert all(r is not None and r.group_size == 2 for r in results), results
        for averager in averagers:
            with averager.get_tensors() as (t,):
                assert torch.allclose(t, torch.full((3,), 2.0))

        alone = averagers[0]
        started = time.monotonic()
        with pytest.raises(AllreduceException, match="no group formed under 'lone'"):
            lone = DecentralizedAverager([torch.zeros(2)], dhts[0], prefix="lone", matchmaking_time=0.5)
            averagers.append(lone)
            lone.step(timeout=1.5)  # retries (allow_retries=True) until the timeout, then raises
        assert time.monotonic() - started < 10
        with pytest.raises(AllreduceException, match="1 attempt"):
            lone.step(timeout=5.0, allow_retries=False)
        future = lone.step(timeout=1.0, wait=False)
        with pytest.raises(AllreduceException):
            future.result(10)
        assert lone.step(timeout=1.0, raise_on_failure=False) is None
        assert alone.core.target_group_size > 1000  # no upper bound
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_allreduce_exception_is_exported_like_hivemind():
    import hivesim
    from hivesim.averaging import AllreduceException

    assert hivesim.AllreduceException is AllreduceException and "AllreduceException" in hivesim.__all__


# ---------------------------------------------------------------- MoE: synchronous beam search, get_experts


def test_blocking_beam_search_and_get_experts():
    """hivemind's synchronous calls on the blocking DHT, over the same async search the MoE layers use."""
    import torch

    from hivesim.moe import BlockingMoEBeamSearcher, MoEBeamSearcher, RemoteExpert, get_experts
    from tests.moe_swarm import scaled, swarm

    cells = [(i, j) for i in range(2) for j in range(3) if (i, j) != (1, 2)]  # expert.1.2 is not hosted
    with swarm() as s:
        s.host({f"expert.{i}.{j}": scaled(f"expert.{i}.{j}", 4, float(1 + i + j)) for i, j in cells})
        client = s.client()
        searcher = MoEBeamSearcher(client, "expert.", (2, 3))  # hivemind's spelling of the prefix
        assert isinstance(searcher, BlockingMoEBeamSearcher)
        assert isinstance(MoEBeamSearcher(client.node, "expert", (2, 3)), MoEBeamSearcher)  # the async one stays

        # expert.i.j scores s0[i] + s1[j]: 1.1 = 15, (1.2 absent), 1.0 = 10, 0.1 = 5, 0.2 = 2, 0.0 = 0
        best = searcher.find_best_experts([torch.tensor([0.0, 10.0]), torch.tensor([0.0, 5.0, 2.0])], beam_size=3)
        assert [e.uid for e in best] == ["expert.1.1", "expert.1.0", "expert.0.1"]
        assert all(isinstance(e, RemoteExpert) for e in best)
        assert torch.allclose(best[0](torch.ones(2, 4)), torch.full((2, 4), 3.0))  # it calls the server

        batch = searcher.batch_find_best_experts([torch.tensor([[0.0, 10.0], [10.0, 0.0]]),
                                                  torch.tensor([[0.0, 5.0, 2.0], [0.0, 5.0, 2.0]])], beam_size=2)
        assert [[e.uid for e in row] for row in batch] == [["expert.1.1", "expert.1.0"], ["expert.0.1", "expert.0.2"]]
        future = searcher.find_best_experts([torch.tensor([10.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])], 1, return_future=True)
        assert [e.uid for e in future.result(30)] == ["expert.0.0"]

        found = get_experts(client, ["expert.0.0", "expert.1.2", "expert.1.1"])
        assert [None if e is None else e.uid for e in found] == ["expert.0.0", None, "expert.1.1"]
        assert torch.allclose(found[2](torch.ones(1, 4)), torch.full((1, 4), 3.0))
        assert [e.uid for e in get_experts(client, ["expert.0.2"], return_future=True).result(30)] == ["expert.0.2"]
        with pytest.raises(ValueError, match="expert uid"):
            get_experts(client, ["expert.01"])


# ---------------------------------------------------------------- DHT schemas and validators that pickle


def test_schema_validator_keyed_by_field_as_hivemind():
    from pydantic import BaseModel, StrictInt

    from hivesim import SchemaValidator

    class RunInfo(BaseModel):
        step: StrictInt
        peers: dict[str, StrictInt]  # one subkey per peer
        name: str

    validator = SchemaValidator(RunInfo, prefix="run")
    with DHT(record_validators=[validator]) as first, \
            DHT(initial_peers=first.get_visible_maddrs(), record_validators=[SchemaValidator(RunInfo, prefix="run")]) as second:
        expiration = time.time() + 60
        assert second.store("run_step", 3, expiration) and first.get("run_step").value == 3
        assert not second.store("run_step", "3", expiration)  # would be converted: rejected, as hivemind does
        assert not second.store("run_step", 3.5, expiration)
        assert first.get("run_step").value == 3
        assert second.store("run_peers", 5, expiration, subkey="a")
        assert not second.store("run_peers", "five", expiration, subkey="b")
        assert set(first.get("run_peers", latest=True).value) == {"a"}
        assert second.store("run_name", "demo", expiration)
        assert second.store("unrelated", {"any": "thing"}, expiration)  # allow_extra_keys=True (the default)
        assert second.store("step", "not under the prefix", expiration)

    import msgpack

    from hivesim.dht.storage import DHTRecord
    from hivesim.dht.validation import RecordRejected

    strict = SchemaValidator(RunInfo, allow_extra_keys=False)
    strict.validate(DHTRecord(msgpack.packb("step"), None, msgpack.packb(4), time.time() + 60))
    with pytest.raises(RecordRejected, match="not a field of RunInfo"):
        strict.validate(DHTRecord(msgpack.packb("other"), None, msgpack.packb(4), time.time() + 60))
    # the key-prefix form is still there
    with pytest.raises(RecordRejected):
        SchemaValidator("experts.", dict[str, int]).validate(
            DHTRecord(msgpack.packb("experts.a"), None, msgpack.packb({"x": "y"}), time.time() + 60))


class StepInfo(BaseModel):  # a schema pickles by reference: it lives at module level
    step: StrictInt


def test_validators_and_identities_pickle():
    import msgpack

    from hivesim import Identity, SchemaValidator, SignatureValidator, owner_marker
    from hivesim.dht.storage import DHTRecord
    from hivesim.dht.validation import RecordRejected

    identity = Identity()
    again = pickle.loads(pickle.dumps(identity))  # a signing key serialises as its private bytes
    assert again.public_key == identity.public_key and again.peer_id == identity.peer_id

    signer = SignatureValidator(identity)
    copy = pickle.loads(pickle.dumps(signer))
    assert copy.local_public_key == signer.local_public_key
    record = DHTRecord(msgpack.packb(f"mine{owner_marker(identity.public_key)}"), None, msgpack.packb(1), time.time() + 60)
    signed = record._replace(value=copy.sign_value(record))
    signer.validate(signed)  # the copy signs with the same key
    with pytest.raises(RecordRejected):
        SignatureValidator().sign_value(record)  # a different key may not

    schema = pickle.loads(pickle.dumps(SchemaValidator(StepInfo, prefix="run", allow_extra_keys=False)))
    schema.validate(DHTRecord(msgpack.packb("run_step"), None, msgpack.packb(2), time.time() + 60))
    with pytest.raises(RecordRejected):
        schema.validate(DHTRecord(msgpack.packb("run_step"), None, msgpack.packb("2"), time.time() + 60))
    with pytest.raises(RecordRejected):
        schema.validate(DHTRecord(msgpack.packb("elsewhere"), None, msgpack.packb(2), time.time() + 60))


def test_averager_state_sharing_like_hivemind():
    """``load_state_from_peers`` / ``get_current_state`` / ``allow_state_sharing``: a newcomer downloads the
    state a peer shares; a peer that stops sharing is not asked; a donor with other tensors is refused."""
    import torch

    from hivesim import DecentralizedAverager

    class WithMetadata(DecentralizedAverager):
        def get_current_state(self):
            meta, tensors = super().get_current_state()
            return {"epoch": 7, **meta}, tensors

    dhts = [DHT()]
    dhts += [DHT(initial_peers=dhts[0].get_visible_maddrs()) for _ in range(2)]
    averagers = []
    try:
        donor = WithMetadata([torch.arange(6.0), torch.ones(2, 2)], dhts[0], prefix="shared")
        newcomer = DecentralizedAverager([torch.zeros(6), torch.zeros(2, 2)], dhts[1], prefix="shared",
                                         allow_state_sharing=False)
        stranger = DecentralizedAverager([torch.zeros(5)], dhts[2], prefix="shared", allow_state_sharing=False)
        averagers += [donor, newcomer, stranger]
        assert donor.allow_state_sharing and not newcomer.allow_state_sharing
        state = None
        for _ in range(20):  # the donor's declaration takes a moment to reach the DHT
            state = newcomer.load_state_from_peers(timeout=5)
            if state is not None:
                break
            time.sleep(0.25)
        assert state is not None
        meta, tensors = state
        assert meta == {"epoch": 7}
        assert torch.equal(tensors[0], torch.arange(6.0)) and torch.equal(tensors[1], torch.ones(2, 2))
        assert stranger.load_state_from_peers(timeout=3) is None  # the donor's tensors do not fit it
        donor.allow_state_sharing = False
        time.sleep(1.0)
        assert newcomer.load_state_from_peers(timeout=3) is None  # withdrawn
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
