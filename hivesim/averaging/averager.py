"""Decentralized averaging of a set of tensors: an asyncio core for peers, and a blocking facade.

:class:`AveragerCore` lives in a peer's event loop and uses the peer's endpoint and DHT node; a role or
workload awaits :meth:`AveragerCore.step`. :class:`DecentralizedAverager` wraps it for ordinary code
with hivemind's shape: it runs on the blocking :class:`~hivesim.dht.DHT` facade (the core runs in the
DHT's loop thread), and ``step()`` blocks until the round is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hivesim.averaging.allreduce import AllReduce, FaultHook, RoundReport, offload
from hivesim.averaging.partition import DEFAULT_MAX_SHARE
from hivesim.averaging.robust import Aggregation
from hivesim.averaging.state_sharing import StateServer, StateUnavailable, download_state
from hivesim.averaging.grid import GroupKeyManager, check_bits
from hivesim.averaging.matchmaking import BanList, GroupInfo, Matchmaker
from hivesim.averaging.timing import AdaptiveDeadline
from hivesim.dht.node import DHTNode
from hivesim.dht.storage import get_dht_time
from hivesim.net.codecs import resolve_codec
from hivesim.net.rpc import Endpoint

logger = logging.getLogger(__name__)

KEEP_BEFORE_NUMEL = 1 << 24  # up to this size a step keeps a copy so that local updates made meanwhile survive
# ``target_group_size=None`` (hivemind's default): no upper bound on a group. Not a power of two, so the group
# key does not grow bits for it; the group forms when matchmaking ends or nobody else is waiting.
UNBOUNDED_GROUP_SIZE = 1_000_000


class AllreduceException(Exception):
    """An averaging step that did not average (no group formed in time), raised as hivemind raises it;
    ``DecentralizedAverager.step(..., raise_on_failure=False)`` returns None instead."""


class StepResult(dict):
    """What :meth:`step` returns on success: ``{peer_id: gathered data}`` of the group's members, with
    the round's details as attributes."""

    group_id: bytes
    group_size: int
    my_index: int
    averaged_fraction: float
    failed_members: list[int]
    matchmaking_s: float
    allreduce_s: float
    part_sizes: list[int]


@dataclass
class Timings:
    matchmaking: AdaptiveDeadline
    allreduce: AdaptiveDeadline


class AveragerCore:
    """Averages ``tensors`` with other peers that use the same ``prefix`` (asyncio; one per prefix per endpoint).

    Args:
        endpoint, dht: the peer's endpoint and DHT node (handlers ``avg.<prefix>.*`` go on the endpoint).
        tensors: what to average; the core keeps its own copies (see :meth:`get_tensors`).
        prefix: the name of the averaged state; peers with the same prefix average together.
        target_group_size, min_group_size: group size bounds (``target_group_size=None``: no upper bound).
        initial_group_bits: the starting group key bits (e.g. a line of a Moshpit grid).
        key_manager: how the bits change between rounds (default: rotate by log2(target_group_size) bits).
        bandwidth: this peer's throughput (any unit shared by the swarm); parts are sized by it.
        client_mode: send and receive but reduce no part (a peer others cannot reach).
        auxiliary: reduce a part but contribute no tensors (a helper with bandwidth, no data).
        compression: codec of the parts on the wire ("float16", "uniform8", a Codec or None).
        matchmaking_time, allreduce_timeout: fixed seconds; None adapts them to measured times.
        ban_time: seconds a peer that failed us is not waited on again.
        merge_when_alone: alone under its key, look for company under the sibling and root keys (off for a
            strict Moshpit grid).
        early_start: start a group that is not full before the deadline when nobody else is waiting.
        fault_hook: ``async hook(event, state)`` called at ``"group"`` and ``"reduced"`` (fault injection).
        aggregation: how this peer reduces its part: ``"mean"`` (default), or a Byzantine-robust rule
            (``"centered_clip"``, ``"trimmed_mean"``, ``"median"``, or an :class:`Aggregation` with parameters;
            see :mod:`hivesim.averaging.robust`).
        max_share: the most of a round's vector one member reduces (default 0.5: a member lying about its
            bandwidth gets at most that); 1.0 or None restores DeDLOC's unconstrained load balancing.
    """

    def __init__(self, endpoint: Endpoint, dht: DHTNode, tensors: Sequence[torch.Tensor], *, prefix: str,
                 target_group_size: int | None, min_group_size: int = 2, initial_group_bits: str = "",
                 key_manager: GroupKeyManager | None = None, bandwidth: float | None = None,
                 client_mode: bool = False, auxiliary: bool = False, compression: Any = None,
                 matchmaking_time: float | None = None, allreduce_timeout: float | None = None,
                 request_timeout: float = 3.0, ban_time: float = 30.0, merge_when_alone: bool = True,
                 early_start: bool = True, fault_hook: FaultHook | None = None,
                 aggregation: "str | Aggregation | None" = None, max_share: float | None = DEFAULT_MAX_SHARE) -> None:
        if not tensors:
            raise ValueError("nothing to average: pass at least one tensor")
        if client_mode and auxiliary:
            raise ValueError("a peer cannot be both client_mode (reduces nothing) and auxiliary (contributes nothing)")
        if bandwidth is not None and (not math.isfinite(bandwidth) or bandwidth <= 0):
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        if not isinstance(prefix, str) or not prefix or "." in prefix:
            raise ValueError(f"prefix must be a non-empty name without dots, got {prefix!r}")
        check_bits(initial_group_bits)
        self.endpoint = endpoint
        self.dht = dht
        self.prefix = prefix
        self.tensors = [t.detach().to("cpu", copy=True) for t in tensors]
        for t in self.tensors:
            if not t.is_floating_point():
                raise TypeError(f"only floating point tensors can be averaged, got {t.dtype}")
        self.numel = sum(t.numel() for t in self.tensors)
        self.lock = threading.Lock()  # guards self.tensors between a step's write-back and get_tensors()
        self.version = 0
        self.client_mode = client_mode
        self.auxiliary = auxiliary
        self.bandwidth = float(bandwidth or 1.0)
        self.codec = resolve_codec(compression)
        if target_group_size is None:
            target_group_size = UNBOUNDED_GROUP_SIZE
        if isinstance(target_group_size, bool) or not isinstance(target_group_size, int):
            raise TypeError(f"target_group_size must be an int or None (no limit), got {target_group_size!r}")
        self.target_group_size = target_group_size
        chunk = (target_group_size.bit_length() - 1) if target_group_size & (target_group_size - 1) == 0 else 0
        self.keys = key_manager or GroupKeyManager(prefix, initial_group_bits, chunk if initial_group_bits else 0)
        self.timings = Timings(
            AdaptiveDeadline(matchmaking_time, initial=5.0, factor=3.0, margin=0.5, floor=1.0, ceiling=30.0),
            AdaptiveDeadline(allreduce_timeout, initial=30.0, factor=3.0, margin=1.0, floor=2.0, ceiling=300.0),
        )
        self.bans = BanList(ban_time)
        name = f"avg.{prefix}"
        self.matchmaker = Matchmaker(endpoint, dht, name, target_group_size=target_group_size,
                                     min_group_size=min_group_size, client_mode=client_mode, bans=self.bans,
                                     request_timeout=request_timeout, merge_when_alone=merge_when_alone,
                                     early_start=early_start)
        self.allreduce = AllReduce(endpoint, name, self.bans, fault_hook, aggregation)
        self.allreduce.max_share = max_share
        self.fault_hook = fault_hook
        self.started = False
        self.steps = 0
        self.successes = 0
        self.last: StepResult | None = None
        self._step_lock = asyncio.Lock()

    async def start(self) -> "AveragerCore":
        if not self.started:
            self.matchmaker.register()
            self.allreduce.register()
            self.started = True
        return self

    async def close(self) -> None:
        if self.started:
            self.matchmaker.unregister()
            self.allreduce.unregister()
            self.started = False

    @property
    def peer_id(self) -> bytes:
        return self.dht.peer_id

    @contextlib.contextmanager
    def get_tensors(self) -> Iterator[list[torch.Tensor]]:
        """The averaged tensors, to read or change in place; a step's write-back waits meanwhile."""
        with self.lock:
            self.version += 1
            yield self.tensors

    def _flatten(self) -> torch.Tensor:
        with self.lock:
            return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in self.tensors])

    def _write_back(self, averaged: torch.Tensor, before: torch.Tensor | None, version: int,
                    keep: list[tuple[int, int]] | None = None) -> None:
        """Copy the averaged vector into the tensors, except the flat ranges in ``keep`` (left as they are)."""
        with self.lock:
            changed = self.version != version
            if changed and before is None:
                logger.warning("tensors changed during a step of a %d-element vector: local changes are overwritten", self.numel)
            offset = 0
            for t in self.tensors:
                n = t.numel()
                new = averaged[offset : offset + n]
                kept = [(max(a, offset) - offset, min(b, offset + n) - offset) for a, b in keep or () if a < offset + n and b > offset]
                if kept:  # rare (a reply broke off mid-stream): those elements take their current values
                    new, current = new.clone(), t.detach().reshape(-1).to(torch.float32)
                    for a, b in kept:
                        new[a:b] = current[a:b] if before is None else before[offset + a : offset + b]
                new = new.view(t.shape)
                if changed and before is not None:
                    t.add_((new - before[offset : offset + n].view(t.shape)).to(t.dtype))
                else:
                    t.copy_(new)
                offset += n

    async def step(self, weight: float = 1.0, timeout: float | None = None, gather: Any = None,
                   deadline: float | None = None) -> StepResult | None:
        """Find a group and average with it. Returns ``{peer_id: gathered}`` of the group, or None if no
        group formed in time. ``deadline`` (DHT time) fixes when matchmaking ends (scheduled rounds);
        ``timeout`` bounds the whole step."""
        if not self.started:
            raise RuntimeError("the averager is not started")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        async with self._step_lock:
            self.steps += 1
            started = time.monotonic()
            window = self.timings.matchmaking.value
            if timeout is not None:
                window = min(window, timeout / 2)
            end = deadline if deadline is not None else get_dht_time() + window
            me = {"id": self.peer_id, "addr": self.endpoint.address, "bw": self.bandwidth,
                  "client": self.client_mode, "aux": self.auxiliary, "gather": gather,
                  "w": 0.0 if self.auxiliary else float(weight)}  # reducers hold our contribution to this
            group = await self.matchmaker.look_for_group(self.keys.key, end, me)
            if group is None:
                self.keys.after_sitting_out()
                return None
            if group.size >= self.target_group_size and deadline is None:
                self.timings.matchmaking.observe(group.formed_in)
            matchmaking_s = time.monotonic() - started
            budget = self.timings.allreduce.value
            if timeout is not None:
                budget = max(0.5, min(budget, timeout - matchmaking_s))
            if self.fault_hook is not None:
                await self.fault_hook("group", group)  # type: ignore[arg-type]
            report = await self._average(group, weight, budget)
            self.keys.after_group(group.my_index)
            self.keys.adapt(group.bucket_size)
            if not report.failed_members:
                self.timings.allreduce.observe(report.seconds)
            self.successes += 1
            result = StepResult({m["id"]: m["gather"] for m in group.members})
            result.group_id, result.group_size, result.my_index = group.group_id, group.size, group.my_index
            result.averaged_fraction, result.failed_members = report.averaged_fraction, report.failed_members
            result.matchmaking_s, result.allreduce_s = matchmaking_s, report.seconds
            result.part_sizes = report.part_sizes
            self.last = result
            return result

    async def _average(self, group: GroupInfo, weight: float, budget: float) -> RoundReport:
        version = self.version
        # a big vector is copied on an executor thread: other peers of this loop keep being served meanwhile
        flat = await offload(self._flatten, numel=self.numel)
        before = flat.clone() if self.numel <= KEEP_BEFORE_NUMEL else None
        averaged, report = await self.allreduce.run(group, flat, weight, codec=self.codec, timeout=budget,
                                                    contribute=not self.auxiliary)
        if not self.auxiliary:
            await offload(self._write_back, averaged, before, version, report.spoiled, numel=self.numel)
        return report

    def skip_round(self) -> None:
        """Sit this round out (Moshpit: move along the peer's own grid coordinate)."""
        self.keys.after_sitting_out()

    def status(self) -> dict[str, Any]:
        return {"steps": self.steps, "successes": self.successes, "key": self.keys.key,
                "matchmaking_s": round(self.timings.matchmaking.value, 3), "allreduce_timeout_s": round(self.timings.allreduce.value, 3)}


class DecentralizedAverager:
    """Average tensors with peers found through a :class:`~hivesim.dht.DHT` (blocking API, like hivemind's).

    Args:
        averaged_tensors: tensors to average (copied; read and change them through :meth:`get_tensors`).
        dht: a running :class:`~hivesim.dht.DHT`; the averager serves on its endpoint, in its loop thread.
        prefix, target_group_size, min_group_size, initial_group_bits, bandwidth, client_mode, auxiliary,
        compression, allreduce_timeout, matchmaking_time: see :class:`AveragerCore`.
        start: register the averager right away (else call :meth:`run_in_background`).
        allow_state_sharing: serve :meth:`get_current_state` to newcomers (default: unless a client or
            auxiliary peer, as in hivemind); see :meth:`load_state_from_peers`.

    ``target_group_size=None`` (hivemind's default) puts no upper bound on a group.

    Example::

        dht = DHT(initial_peers=peers)
        averager = DecentralizedAverager([w], dht, prefix="model", target_group_size=4)
        try:
            result = averager.step(weight=batch_size, timeout=30)
        except AllreduceException:   # no group formed (or step(..., raise_on_failure=False) -> None)
            result = None
        with averager.get_tensors() as (w_avg,):
            model.weight.copy_(w_avg)
    """

    def __init__(self, averaged_tensors: Sequence[torch.Tensor], dht: Any, *, prefix: str, target_group_size: int | None = None,
                 min_group_size: int = 2, initial_group_bits: str = "", bandwidth: float | None = None,
                 client_mode: bool = False, auxiliary: bool = False, compression: Any = None,
                 allreduce_timeout: float | None = None, matchmaking_time: float | None = None,
                 request_timeout: float = 3.0, start: bool = True, allow_state_sharing: bool | None = None,
                 **kwargs: Any) -> None:
        self.dht = dht
        # hivemind's default: peers others can reach share their state, clients and auxiliaries do not
        self._share_state = (not client_mode and not auxiliary) if allow_state_sharing is None else bool(allow_state_sharing)
        self._state_server: StateServer | None = None
        self._core_kwargs = dict(prefix=prefix, target_group_size=target_group_size, min_group_size=min_group_size,
                                 initial_group_bits=initial_group_bits, bandwidth=bandwidth, client_mode=client_mode,
                                 auxiliary=auxiliary, compression=compression, allreduce_timeout=allreduce_timeout,
                                 matchmaking_time=matchmaking_time, request_timeout=request_timeout, **kwargs)
        node = dht.node
        self.core = AveragerCore(node.endpoint, node, averaged_tensors, **self._core_kwargs)
        if start:
            self.run_in_background()

    def run_in_background(self) -> None:
        async def start(_dht: Any, node: Any) -> None:
            await self.core.start()
            if self._share_state:
                await self._serve_state(node)

        self.dht.run_coroutine(start)

    # ------------------------------------------------------------------ state for newcomers (hivemind's API)

    @property
    def allow_state_sharing(self) -> bool:
        """Whether this averager serves :meth:`get_current_state` to peers that call
        :meth:`load_state_from_peers` (settable; it declares or withdraws itself as a donor)."""
        return self._share_state

    @allow_state_sharing.setter
    def allow_state_sharing(self, value: bool) -> None:
        value = bool(value)
        if value == self._share_state:
            return
        self._share_state = value
        if not self.core.started:
            return
        if value:
            self.dht.run_coroutine(lambda _dht, node: self._serve_state(node))
        else:
            self.dht.run_coroutine(lambda _dht, _node: self._stop_serving_state())

    def get_current_state(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """What this peer shares with newcomers: ``(metadata, tensors)``. The default shares the averaged
        tensors and no metadata; override it (as hivemind's subclasses do) to share more."""
        with self.core.get_tensors() as tensors:
            return {}, [t.detach().clone() for t in tensors]

    def load_state_from_peers(self, wait: bool = True, timeout: float | None = None
                              ) -> tuple[dict[str, Any], list[torch.Tensor]] | None | Any:
        """Download ``(metadata, tensors)`` from the peers sharing state under this prefix (several at once,
        each tensor checked for shape, dtype and finite values against the donor's manifest); None if
        nobody shares it. The caller decides what to do with it (hivemind's contract); ``wait=False``
        returns a concurrent Future of the result."""
        prefix = self.core.prefix
        with self.core.get_tensors() as ours:
            names = [str(i) for i in range(len(ours))]
            shapes, dtypes = [tuple(t.shape) for t in ours], [t.dtype for t in ours]

        def expect(their_names: list[str], their_shapes: list[tuple[int, ...]], their_dtypes: list[torch.dtype]) -> None:
            if their_names != names or their_shapes != shapes or their_dtypes != dtypes:
                raise ValueError("the donor's tensors are not this averager's (names, shapes or dtypes differ)")

        async def fetch(_dht: Any, node: Any) -> tuple[dict[str, Any], list[torch.Tensor]] | None:
            try:
                state = await download_state(node.endpoint, node, f"{prefix}_avgstate", timeout=timeout or 60.0,
                                             exclude=node.peer_id, expect=expect)
            except StateUnavailable as e:
                logger.info("load_state_from_peers: %s", e)
                return None
            return dict(state.meta), [state.tensors[name] for name in names]

        future = self.dht.run_coroutine(fetch, return_future=True)
        if not wait:
            return future
        return future.result(None if timeout is None else timeout + 5.0)

    async def _serve_state(self, node: Any) -> None:
        if self._state_server is not None:
            return

        def provide() -> tuple[int, dict[str, Any], list[tuple[str, torch.Tensor]]]:
            meta, tensors = self.get_current_state()
            return self.core.successes, meta, [(str(i), t) for i, t in enumerate(tensors)]

        server = StateServer(node.endpoint, node, f"{self.core.prefix}_avgstate", provide)
        server.epoch_now = lambda: self.core.successes
        self._state_server = await server.start()

    async def _stop_serving_state(self) -> None:
        server, self._state_server = self._state_server, None
        if server is not None:
            await server.close()

    @property
    def peer_id(self) -> bytes:
        return self.core.peer_id

    def step(self, weight: float | None = 1.0, timeout: float | None = None, gather: Any = None, wait: bool = True, *,
             allow_retries: bool = True, raise_on_failure: bool = True) -> StepResult | None | Any:
        """Find a group and average; blocks until the round is over (``wait=False``: a concurrent Future of it).

        hivemind's semantics, by keyword (the positional order differs from hivemind's ``step(gather, ...)``):
        with ``allow_retries`` (default) a step that found no group tries again until ``timeout`` runs out;
        ``allow_retries=False`` makes one attempt. A step that did not average raises
        :class:`AllreduceException` (hivemind's), or, with ``raise_on_failure=False``, returns None (hivesim's
        earlier behaviour, convenient in loops that just skip a round). Without a ``timeout`` a step makes one
        matchmaking attempt (hivemind would retry forever). ``weight=None`` means 1.0.
        Returns ``{peer_id: gathered}`` of the group, with the round's details as attributes."""
        weight = 1.0 if weight is None else weight
        core, prefix = self.core, self.core.prefix

        async def attempts(_dht: Any, _node: Any) -> StepResult | None:
            started = time.monotonic()
            tries = 0
            while True:
                left = None if timeout is None else timeout - (time.monotonic() - started)
                tries += 1
                result = await core.step(weight, left, gather)
                if result is not None:
                    return result
                left = None if timeout is None else timeout - (time.monotonic() - started)
                if not allow_retries or left is None or left < 0.5:
                    break
            if raise_on_failure:
                raise AllreduceException(f"averaging step failed: no group formed under {prefix!r} "
                                         f"({tries} attempt{'s' if tries > 1 else ''}"
                                         f"{f' in {timeout:g} s' if timeout is not None else ''})")
            return None

        future = self.dht.run_coroutine(attempts, return_future=True)
        if not wait:
            return future
        return future.result(None if timeout is None else timeout + 5.0)

    @contextlib.contextmanager
    def get_tensors(self) -> Iterator[list[torch.Tensor]]:
        """``with averager.get_tensors() as tensors:`` read or update the averaged tensors in place."""
        with self.core.get_tensors() as tensors:
            yield tensors

    def shutdown(self) -> None:
        """Stop serving (idempotent); the DHT stays up."""
        if self.core.started and self.dht.is_alive:
            async def close(_dht: Any, _node: Any) -> None:
                await self._stop_serving_state()
                await self.core.close()

            try:
                self.dht.run_coroutine(close)
            except RuntimeError:
                pass

    def __enter__(self) -> "DecentralizedAverager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
