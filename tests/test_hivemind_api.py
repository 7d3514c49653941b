"""hivemind's API shapes on hivesim (issue 16): what a hivemind script calls works here, on real sockets."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

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
