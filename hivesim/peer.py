"""``Peer``: one participant of a swarm — an endpoint, a DHT node and the roles its config names.

The same object runs inside a Ray actor in simulation (``hivesim/sim``) and under plain
``asyncio.run`` on a volunteer host (``hivesim peer``); only the link model it is handed differs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hivesim.dht.facade import normalize_initial_peers
from hivesim.dht.node import DHTNode
from hivesim.metrics import Metrics
from hivesim.net.identity import Identity
from hivesim.net.links import LinkModel
from hivesim.net.rpc import Endpoint
from hivesim.roles import Role, load_role

logger = logging.getLogger(__name__)

RoleSpecs = Mapping[str, Mapping[str, Any] | None] | Sequence[str | Mapping[str, Mapping[str, Any] | None]]


def normalize_roles(roles: RoleSpecs | None) -> dict[str, dict[str, Any]]:
    """``["a", "b"]``, ``{"a": {...}, "b": None}`` or ``["a", {"b": {...}}]`` -> ``{"a": {...}, "b": {}}``;
    ``dht`` is implicit. A config author writes whichever reads best; a list item that is neither a name
    nor a ``{name: params}`` mapping, or a role named twice, is a ``ValueError`` (not a confusing import)."""
    if roles is None:
        return {}
    if isinstance(roles, str):
        raise ValueError(f"roles must be a list of role names or a mapping {{name: params}}, got the string {roles!r}")
    pairs: list[tuple[Any, Any]] = []
    if isinstance(roles, Mapping):
        pairs = list(roles.items())
    else:
        for item in roles:
            if isinstance(item, Mapping):
                pairs += list(item.items())
            elif isinstance(item, str):
                pairs.append((item, None))
            else:
                raise ValueError(f"a role is a name or a {{name: params}} mapping, got {item!r}")
    items: dict[str, dict[str, Any]] = {}
    for name, params in pairs:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a role name is a non-empty string, got {name!r}")
        if params is not None and not isinstance(params, Mapping):
            raise ValueError(f"role {name!r}: parameters are a mapping {{param: value}}, got {params!r}")
        if name in items:
            raise ValueError(f"role {name!r} is named twice")
        items[name] = dict(params or {})
    items.pop("dht", None)  # every peer is a DHT node
    return items


class Peer:
    """A swarm participant.

    Args:
        name: how metrics and logs call it.
        roles: role names (or ``{name: params}``) beyond the DHT node every peer runs.
        host, port, advertise_host: where the endpoint binds and what address it advertises.
        links: the link model (``ShapedLinks`` in simulation; real network otherwise).
        identity: the peer's key pair (its DHT id derives from it); fresh if omitted.
        dht: keyword arguments for :meth:`DHTNode.create` (``bucket_size``, ``rpc_timeout``...).
        endpoint: keyword arguments for :class:`~hivesim.net.Endpoint` (``pool_size``...).
    """

    def __init__(
        self,
        name: str = "peer",
        roles: RoleSpecs | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        links: LinkModel | None = None,
        identity: Identity | None = None,
        dht: Mapping[str, Any] | None = None,
        endpoint: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.role_specs = normalize_roles(roles)
        self.identity = identity or Identity()
        self.metrics = Metrics(name)
        self.endpoint = Endpoint(host, port, links=links, advertise_host=advertise_host, identity=self.identity,
                                 **dict(endpoint or {}))
        self.dht_options = dict(dht or {})
        self.dht: DHTNode | None = None
        self.roles: dict[str, Role] = {}
        self._tasks: set[asyncio.Task] = set()
        self.state = "new"

    @property
    def address(self) -> str:
        return self.endpoint.address

    async def start(self, initial_peers: str | Iterable[str] = ()) -> "Peer":
        """Bind, join the DHT through ``initial_peers``, start every role."""
        if self.state != "new":
            raise RuntimeError(f"peer {self.name} was already started ({self.state})")
        self.state = "starting"
        role_classes = {name: load_role(name) for name in self.role_specs}  # fail before binding anything
        try:
            await self.endpoint.start()
            self.dht = await DHTNode.create(normalize_initial_peers(initial_peers), endpoint=self.endpoint, identity=self.identity, **self.dht_options)
            for name, cls in role_classes.items():
                role = cls(self, **self.role_specs[name])
                await role.start()
                self.roles[name] = role
        except BaseException:
            await self.kill()
            raise
        self.state = "running"
        self.metrics.event("started", address=self.address)
        return self

    def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task:
        """Run a background coroutine that dies with the peer; its crash is logged and counted."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.metrics.count("task_crashes")
            self.metrics.event("task_crashed", task=task.get_name(), error=repr(task.exception()))
            logger.error("peer %s: task %s crashed", self.name, task.get_name(), exc_info=task.exception())

    async def stop(self, timeout: float = 10.0) -> None:
        """Leave politely: roles stop (within ``timeout``), then the DHT node and the endpoint."""
        if self.state in ("stopped", "killed"):
            return
        for name, role in reversed(list(self.roles.items())):
            try:
                await asyncio.wait_for(role.stop(), timeout)
            except Exception as e:
                logger.warning("peer %s: role %s did not stop cleanly: %r", self.name, name, e)
        self.metrics.event("stopped")
        await self._close()
        self.state = "stopped"

    async def kill(self) -> None:
        """Vanish at once, as a crashed process would: no goodbye, in-flight work is dropped."""
        if self.state in ("stopped", "killed"):
            return
        self.metrics.event("killed")
        await self._close()
        self.state = "killed"

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.dht is not None:
            await self.dht.shutdown()
        await self.endpoint.close()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "state": self.state}
        if self.dht is not None:
            out["contacts"] = len(self.dht.routing)
        for name, role in self.roles.items():
            out.update({f"{name}.{k}": v for k, v in role.status().items()})
        return out
