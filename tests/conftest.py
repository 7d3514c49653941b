"""Shared fixtures: real endpoints on loopback, always closed by the test that made them."""

from __future__ import annotations

import pytest

from hivesim.net import Endpoint


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
