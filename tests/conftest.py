"""Shared fixtures: real endpoints on loopback, always closed by the test that made them."""

from __future__ import annotations

import pytest
import zmq

from hivesim.net import Endpoint, Identity
from hivesim.net.limits import shared_context
from hivesim.net.secure import CurveKeys, format_address, secure_client, split_address

# where nobody listens, named like a real peer's address (with a key), so that calls fail as unreachable
DEAD_ADDRESS = format_address("tcp://127.0.0.1:1", CurveKeys.from_identity(Identity()).public)


def raw_client(address: str, identity: Identity | None = None) -> zmq.Socket:
    """A bare DEALER connected to ``address`` as a peer that speaks the wire protocol by hand would be:
    over CurveZMQ with a key of its own when the address names the server's key. The caller closes it."""
    sock = shared_context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    base, server_key = split_address(address)
    if server_key is not None:
        secure_client(sock, CurveKeys.from_identity(identity or Identity()), server_key)
    sock.connect(base)
    return sock


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run the full-size (slow) studies")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="full-size study: run with --runslow (CI runs the short version)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
async def make_endpoint():
    """Factory for started endpoints; every one is closed at teardown."""
    made: list[Endpoint] = []

    async def make(**kwargs) -> Endpoint:
        endpoint = await Endpoint(**kwargs).start()
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        await endpoint.close()
