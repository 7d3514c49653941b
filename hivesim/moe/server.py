"""``ExpertServer``: hosts experts on an endpoint, serves forward/backward, declares them in the DHT.

Wire methods (payloads are msgpack maps, tensors travel as raw frames):

* ``moe.forward``  ``{"uid", "x"}``       -> ``{"y"}``
* ``moe.backward`` ``{"uid", "x", "g"}``  -> ``{"gx"}`` (and the expert takes an optimizer step)
* ``moe.info``     ``{"uid"}``            -> the expert's type, hidden size and sample shape

A request that makes no sense (unknown uid, a non-tensor, wrong sample shape, too many samples) is
answered with a typed error and changes nothing; the server keeps serving. Each request is checked on
its own before it is pooled with others (see :mod:`hivesim.moe.runtime`): NaN/inf values are refused and a
backward whose gradients come out non-finite is not applied, so one client cannot poison an expert or
fail other clients' calls. A streamed request declaring more than ``max_request_bytes`` or rows that do not
fit is refused from its header, before its bytes arrive (see :mod:`hivesim.moe.validation`). Experts are
re-declared in the DHT every ``update_period`` seconds with an expiration ``expiration`` seconds ahead, and are saved
to ``checkpoint_dir`` every ``checkpoint_period`` seconds and at :meth:`stop`; :meth:`start` restores
what that folder holds.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from hivesim.dht.storage import get_dht_time
from hivesim.moe.experts import make_expert, sample_shape
from hivesim.moe.runtime import ExpertBackend, Runtime, default_device
from hivesim.moe.uids import declaration_items, expand_pattern, parse_uid
from hivesim.moe.validation import RequestGuard, check_declared, default_max_request_bytes
from hivesim.net.rpc import CallContext, Endpoint

logger = logging.getLogger(__name__)

FORWARD, BACKWARD, INFO = "moe.forward", "moe.backward", "moe.info"


class UnknownExpert(KeyError):
    """The server hosts no expert of that uid."""


class BadExpertRequest(ValueError):
    """A forward/backward request whose tensors do not fit the expert."""


def adam(lr: float = 1e-3) -> Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr)


class ExpertServer:
    """Serves a set of experts.

    Args:
        backends: the experts, ``{uid: ExpertBackend}`` (see :meth:`create` to build them by type).
        dht: a :class:`~hivesim.dht.DHTNode` (inside a peer) or a blocking :class:`~hivesim.DHT`; the
            server serves on the DHT node's endpoint and declares its experts there. ``None``: no
            declarations (clients must be told the address), and the server binds its own endpoint.
        endpoint: serve here instead (only without ``dht``).
        max_batch_size: most samples the runtime pools into one batch.
        expiration: seconds a declaration stays valid; ``update_period`` (default ``expiration / 3``)
            is how often the server re-declares.
        checkpoint_dir, checkpoint_period: where and how often experts are saved.
        max_request_samples: largest batch one request may carry (default ``8 * max_batch_size``).
        max_request_bytes: most bytes one forward/backward request may declare; larger streamed requests
            are refused from their header (default: ``max_request_samples`` float64 rows of input and
            output gradient, plus 1 MiB). A server that binds its own endpoint also caps every message
            there at this size.
    """

    def __init__(
        self,
        backends: dict[str, ExpertBackend],
        *,
        dht: Any = None,
        endpoint: Endpoint | None = None,
        max_batch_size: int = 4096,
        expiration: float = 120.0,
        update_period: float | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_period: float | None = None,
        max_request_samples: int | None = None,
        max_request_bytes: int | None = None,
    ) -> None:
        for uid in backends:
            parse_uid(uid)
        self.backends = backends
        self.dht = dht
        self._endpoint = endpoint
        self._owns_endpoint = False
        self.runtime = Runtime(backends, max_batch_size)
        self.expiration = float(expiration)
        self.update_period = float(update_period) if update_period else self.expiration / 3
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_period = checkpoint_period
        self.max_request_samples = max_request_samples or 8 * max_batch_size
        self.max_request_bytes = int(max_request_bytes or default_max_request_bytes(backends, self.max_request_samples))
        self.guard = RequestGuard(self.max_request_bytes, self._admit_declared)
        self.declarations = 0
        self.restored: list[str] = []  # uids restored from checkpoint_dir at start
        self.declaration_failures = 0
        self.started_at = 0.0
        self._tasks: list[asyncio.Task] = []
        self._running = False

    @classmethod
    def create(
        cls,
        expert_uids: Iterable[str] | str,
        expert_cls: str = "ffn",
        hidden_dim: int = 1024,
        *,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] | None = None,
        device: str | torch.device | None = None,
        expert_kwargs: dict[str, Any] | None = None,
        seed: int | None = None,
        **server_kwargs: Any,
    ) -> "ExpertServer":
        """Host one expert of type ``expert_cls`` per uid (a list, or a pattern like ``"ffn.[0:4].[0:4]"``).
        ``optimizer(params)`` builds each expert's optimizer (default Adam, lr 1e-3)."""
        uids = expand_pattern(expert_uids) if isinstance(expert_uids, str) else list(expert_uids)
        make_optimizer = optimizer or adam()
        device = torch.device(device) if device is not None else default_device()
        shape = sample_shape(expert_cls, hidden_dim)
        backends = {}
        for i, uid in enumerate(uids):
            if seed is not None:
                torch.manual_seed(seed + i)
            module = make_expert(expert_cls, hidden_dim, **(expert_kwargs or {}))
            params = [p for p in module.parameters() if p.requires_grad]
            backends[uid] = ExpertBackend(uid, module, make_optimizer(params) if params else None, shape,
                                          expert_cls, hidden_dim, device)
        return cls(backends, **server_kwargs)

    # ------------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise RuntimeError("the server is not started")
        return self._endpoint

    @property
    def address(self) -> str:
        return self.endpoint.address

    def _dht_node(self) -> Any:
        """The async DHT node, whether we were handed a node or the blocking facade."""
        if self.dht is None:
            return None
        return self.dht.node if hasattr(self.dht, "run_coroutine") else self.dht

    async def start(self) -> "ExpertServer":
        """Restore checkpoints, start the runtime, serve, and declare the experts (awaited once)."""
        if self._running:
            return self
        node = self._dht_node()
        if node is not None:
            self._endpoint = node.endpoint
        elif self._endpoint is None:
            self._endpoint = await Endpoint(max_message_bytes=self.max_request_bytes).start()
            self._owns_endpoint = True
        if self.checkpoint_dir is not None:
            self.restored = await asyncio.get_running_loop().run_in_executor(None, self.load_checkpoint)
        self.runtime.start()
        self.endpoint.register(FORWARD, self._rpc_forward, replace=True, admit=self.guard.check)
        self.endpoint.register(BACKWARD, self._rpc_backward, replace=True, admit=self.guard.check)
        self.endpoint.register(INFO, self._rpc_info, replace=True)
        self._running = True
        self.started_at = time.monotonic()
        loop = asyncio.get_running_loop()
        if node is not None:
            await self.declare()
            self._tasks.append(loop.create_task(self._declare_forever()))
        if self.checkpoint_dir is not None and self.checkpoint_period:
            self._tasks.append(loop.create_task(self._checkpoint_forever()))
        return self

    async def stop(self, save: bool = True) -> None:
        """Stop declaring and serving; save a checkpoint if there is a folder for it."""
        if not self._running:
            return
        self._running = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for name in (FORWARD, BACKWARD, INFO):
            self.endpoint.unregister(name)
        if save and self.checkpoint_dir is not None:
            await self.save_checkpoint()
        await asyncio.get_running_loop().run_in_executor(None, self.runtime.stop)
        if self._owns_endpoint:
            await self.endpoint.close()

    def run_in_background(self, timeout: float = 60.0) -> "ExpertServer":
        """With a blocking :class:`~hivesim.DHT`: start in the DHT's event loop and return when serving."""
        if not hasattr(self.dht, "run_coroutine"):
            raise TypeError("run_in_background needs a blocking hivesim.DHT; inside a peer, await start()")
        self.dht.run_coroutine(lambda dht, node: self.start(), return_future=True).result(timeout)
        return self

    def shutdown(self, timeout: float = 60.0) -> None:
        """Blocking counterpart of :meth:`stop` for servers started with :meth:`run_in_background`."""
        if self.dht is not None and hasattr(self.dht, "run_coroutine") and self.dht.is_alive:
            self.dht.run_coroutine(lambda dht, node: self.stop(), return_future=True).result(timeout)

    # ------------------------------------------------------------------ declarations

    async def declare(self) -> bool:
        """Declare every expert once; True if every record was stored somewhere."""
        node = self._dht_node()
        # owned by this node's key: nobody else can rewrite, redirect or erase these declarations
        items = declaration_items({uid: self.address for uid in self.backends}, get_dht_time() + self.expiration,
                                  owner=node.public_key)
        try:
            outcome = await node.store_many(items)
        except Exception as e:  # noqa: BLE001 - a failed round is retried next period
            logger.warning("declaring experts failed: %r", e)
            self.declaration_failures += 1
            return False
        self.declarations += 1
        ok = all(outcome.values())
        if not ok:
            self.declaration_failures += 1
        return ok

    async def _declare_forever(self) -> None:
        while True:
            await asyncio.sleep(self.update_period)
            await self.declare()

    # ------------------------------------------------------------------ checkpoints

    async def save_checkpoint(self) -> list[Path]:
        """Copy every expert's state between batches, then write ``<uid>.pt`` files (atomically)."""
        assert self.checkpoint_dir is not None, "no checkpoint_dir"
        states = await self.runtime.call(lambda: {uid: copy.deepcopy(b.state()) for uid, b in self.backends.items()})
        return await asyncio.get_running_loop().run_in_executor(None, self._write_states, states)

    def _write_states(self, states: dict[str, dict]) -> list[Path]:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        written = []
        for uid, state in states.items():
            path = self.checkpoint_dir / f"{uid}.pt"  # type: ignore[operator]
            tmp = path.with_suffix(".pt.tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
            written.append(path)
        return written

    def load_checkpoint(self) -> list[str]:
        """Restore the experts that have a file in ``checkpoint_dir``; returns their uids."""
        restored = []
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return restored
        for uid, backend in self.backends.items():
            path = self.checkpoint_dir / f"{uid}.pt"
            if path.exists():
                backend.load_state(torch.load(path, map_location=backend.device, weights_only=True))
                restored.append(uid)
        return restored

    async def _checkpoint_forever(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_period)  # type: ignore[arg-type]
            try:
                await self.save_checkpoint()
            except Exception:  # noqa: BLE001 - keep serving; the next period tries again
                logger.exception("checkpoint failed")

    # ------------------------------------------------------------------ handlers

    def _backend(self, payload: Any) -> ExpertBackend:
        if not isinstance(payload, dict):
            raise BadExpertRequest(f"request must be a map, got {type(payload).__name__}")
        uid = payload.get("uid")
        backend = self.backends.get(uid) if isinstance(uid, str) else None
        if backend is None:
            raise UnknownExpert(f"no expert {uid!r} on this server")
        return backend

    def _tensor(self, payload: dict, name: str, backend: ExpertBackend) -> torch.Tensor:
        x = payload.get(name)
        if not isinstance(x, torch.Tensor):
            raise BadExpertRequest(f"{name!r} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise BadExpertRequest(f"{name!r} must be a floating point tensor, got {x.dtype}")
        if x.dim() != 1 + len(backend.sample_shape) or tuple(x.shape[1:]) != tuple(backend.sample_shape):
            raise BadExpertRequest(f"{name!r} must have shape [batch, {', '.join(map(str, backend.sample_shape))}], "
                                   f"got {list(x.shape)}")
        if not 0 < x.shape[0] <= self.max_request_samples:
            raise BadExpertRequest(f"a request carries 1..{self.max_request_samples} samples, got {x.shape[0]}")
        return x.float()

    def _admit_declared(self, payload: Any) -> None:
        """The header check of a streamed request (its tensors described, not received yet)."""
        check_declared(payload, self.backends, self.max_request_samples)

    async def _rpc_forward(self, payload: Any, ctx: CallContext) -> dict:
        backend = self._backend(payload)
        x = self._tensor(payload, "x", backend)
        return {"y": await self.runtime.forward(backend.uid, x)}

    async def _rpc_backward(self, payload: Any, ctx: CallContext) -> dict:
        backend = self._backend(payload)
        x = self._tensor(payload, "x", backend)
        g = payload.get("g")
        if not isinstance(g, torch.Tensor) or not g.is_floating_point() or g.shape[:1] != x.shape[:1]:
            raise BadExpertRequest(f"'g' must be a float tensor with {x.shape[0]} rows")
        return {"gx": await self.runtime.backward(backend.uid, x, g.float())}

    def _rpc_info(self, payload: Any, ctx: CallContext) -> dict:
        return self._backend(payload).info()

    def status(self) -> dict[str, Any]:
        return {"experts": len(self.backends), "declarations": self.declarations, **self.runtime.stats.as_dict(),
                **self.guard.stats}
