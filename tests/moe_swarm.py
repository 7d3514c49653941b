"""Helpers for the MoE tests: expert-host peers (a blocking DHT + an ExpertServer each), always stopped."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hivesim import DHT
from hivesim.moe import ExpertBackend, ExpertServer, register_expert_class
from hivesim.moe.experts import DelayExpert


@register_expert_class("test_raising")
class RaisingExpert(nn.Module):
    """A custom expert type whose forward always fails."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this expert is broken")


def scaled(uid: str, hid: int, scale: float, delay: float = 0.0, lr: float = 0.0) -> ExpertBackend:
    module = DelayExpert(hid, delay=delay, scale=scale)
    return ExpertBackend(uid, module, torch.optim.SGD(module.parameters(), lr=lr), (hid,), "delay", hid, "cpu")


class Swarm:
    """A bootstrap DHT peer plus expert-host peers; ``kill(i)`` drops a host abruptly."""

    def __init__(self) -> None:
        self.root = DHT()
        self.hosts: list[tuple[DHT, ExpertServer]] = []
        self.clients: list[DHT] = []

    def host(self, backends: dict[str, ExpertBackend] | ExpertServer, **kwargs: Any) -> ExpertServer:
        dht = DHT(initial_peers=self.root.get_visible_addresses())
        server = backends if isinstance(backends, ExpertServer) else ExpertServer(backends, dht=dht, **kwargs)
        server.dht = dht
        self.hosts.append((dht, server))
        server.run_in_background()
        return server

    def client(self) -> DHT:
        dht = DHT(initial_peers=self.root.get_visible_addresses())
        self.clients.append(dht)
        return dht

    def kill(self, server: ExpertServer) -> None:
        """Abrupt: the peer's endpoint closes with the DHT node; the runtime thread is stopped too."""
        for dht, s in self.hosts:
            if s is server:
                dht.shutdown()
                s.runtime.stop()

    def close(self) -> None:
        for dht, server in self.hosts:
            with contextlib.suppress(Exception):
                server.shutdown()
            server.runtime.stop()
            dht.shutdown()
        for dht in self.clients:
            dht.shutdown()
        self.root.shutdown()


@contextlib.contextmanager
def swarm() -> Iterator[Swarm]:
    s = Swarm()
    try:
        yield s
    finally:
        s.close()
