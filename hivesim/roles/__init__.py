"""Roles: what a peer does besides being a DHT node (host experts, average, train, run a workload).

A role is one small module: a subclass of :class:`Role` that the module exposes as ``ROLE``. Built-in
roles live in this package and are named by their module (``roles: [averager]``); any other role is
named by its import path, ``"package.module:ClassName"`` (this is how workloads in ``experiments/``
plug in). Nothing else needs editing to add one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hivesim.peer import Peer


class Role:
    """Base class. ``start`` runs once the peer's endpoint and DHT node are up; ``stop`` is the polite
    way out; an abrupt kill just cancels the peer's tasks and closes its sockets, skipping ``stop``."""

    name: str = "role"

    def __init__(self, peer: "Peer", **params: Any) -> None:
        self.peer = peer
        self.params = params

    async def start(self) -> None:
        """Start the role's work (spawn long-running loops with ``self.peer.spawn``)."""

    async def stop(self) -> None:
        """Leave politely (finish in-flight work, withdraw declarations)."""

    def status(self) -> dict[str, Any]:
        """A few numbers for progress displays."""
        return {}


def load_role(spec: str) -> type[Role]:
    """``"averager"`` -> ``hivesim.roles.averager.ROLE``; ``"pkg.mod:Cls"`` -> that class."""
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
    else:
        module_name, attribute = f"hivesim.roles.{spec}", "ROLE"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if ":" not in spec and e.name == module_name:
            raise ValueError(f"unknown role {spec!r}: no module {module_name}; custom roles are named 'module:Class'") from None
        raise
    role = getattr(module, attribute, None)
    if not (isinstance(role, type) and issubclass(role, Role)):
        raise ValueError(f"{spec!r} does not name a Role subclass ({module_name}.{attribute})")
    return role
