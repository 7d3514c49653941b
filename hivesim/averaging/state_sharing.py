"""State for newcomers: peers that hold it declare themselves donors; a newcomer downloads it from several
donors at once. The collaborative optimizers (parameters, optimizer state) and ``DecentralizedAverager``
(``load_state_from_peers``) share it.

A donor declares ``{addr, epoch}`` under ``{run_id}_donors`` in a subkey it owns (the DHT checks its
signature, so nobody can declare in another peer's name; unowned entries are ignored). A newcomer picks
the donors at the most advanced epoch, in random order (so newcomers do not all pick the same donor),
asks one for the manifest (names, shapes, dtypes and the non-tensor state) and then asks each donor for
a share of the tensors in parallel. A donor that fails or has moved to another epoch loses its share to
the others; every tensor is tried a bounded number of times, everything within one timeout. Each
tensor is checked against the manifest (shape, dtype, finite) before the caller sees it.

A donor answers from a snapshot of its state taken at the first request of an epoch, so the shares of
one download are consistent even while the donor keeps training; it keeps the snapshots of its last two
epochs, each for at most ``snapshot_ttl`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hivesim.averaging.allreduce import offload
from hivesim.dht.node import DHTNode
from hivesim.dht.storage import get_dht_time
from hivesim.dht.validation import owner_marker, owner_of_subkey
from hivesim.net.codecs import NONE, Codec, get_codec, resolve_codec
from hivesim.net.errors import RPCError
from hivesim.net.identity import peer_id_from_public_key
from hivesim.net.rpc import CallContext, Endpoint

logger = logging.getLogger(__name__)

MAX_EPOCH = 1 << 40  # a donor claiming a later epoch is ignored
MAX_TENSORS = 1 << 16  # a manifest naming more tensors is refused
MAX_ADDRESS = 256

# what a peer's state provider returns: (epoch, non-tensor metadata, [(name, tensor), ...])
StateProvider = Callable[[], tuple[int, dict[str, Any], list[tuple[str, torch.Tensor]]]]


class DonorRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    addr: str = Field(min_length=1, max_length=MAX_ADDRESS)
    epoch: int = Field(ge=0, le=MAX_EPOCH)
    left: bool = False  # withdrawn (the latest expiration wins, so a withdrawal is a newer record)


@dataclass(frozen=True)
class Donor:
    peer_id: bytes
    address: str
    epoch: int


class StateUnavailable(RuntimeError):
    """No donor could provide the state in time (the message says why)."""


class StateServer:
    """Serves this peer's training state and keeps its donor declaration alive (asyncio).

    Args:
        endpoint, dht: the peer's endpoint and DHT node.
        run_id: the run's name (the handlers are ``optim.<run_id>.state_info`` / ``state_part``).
        provider: returns ``(epoch, meta, [(name, tensor), ...])``; called in the loop thread, so it
            must be quick (it copies under the training state's lock).
        compression: codec of floating point tensors on the wire (``load_state_compression``).
        declare: publish the donor declaration (False for peers others cannot reach).
        expiration: seconds a declaration lives; it is renewed at a third of that.
    """

    def __init__(self, endpoint: Endpoint, dht: DHTNode, run_id: str, provider: StateProvider, *,
                 compression: Any = None, declare: bool = True, expiration: float = 30.0,
                 snapshot_ttl: float = 60.0) -> None:
        self.endpoint = endpoint
        self.dht = dht
        self.run_id = run_id
        self.provider = provider
        self.codec = resolve_codec(compression)
        self.declare = declare
        self.expiration = expiration
        self.snapshot_ttl = snapshot_ttl
        self.key = f"{run_id}_donors"
        self.subkey = owner_marker(dht.public_key)
        self.epoch_now: Callable[[], int] = lambda: 0
        # epoch -> (taken at, meta, tensors): the current epoch's and the previous one's, so that a download
        # that started just before this donor moved on still finishes
        self._snapshots: dict[int, tuple[float, dict[str, Any], list[tuple[str, torch.Tensor]]]] = {}
        self._snapshot_lock = asyncio.Lock()
        self._declared_epoch: int | None = None
        self._declared_at = 0.0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.parts_served = 0

    @property
    def info_method(self) -> str:
        return f"optim.{self.run_id}.state_info"

    @property
    def part_method(self) -> str:
        return f"optim.{self.run_id}.state_part"

    async def start(self) -> "StateServer":
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self.endpoint.register(self.info_method, self._rpc_info, replace=True)
            self.endpoint.register(self.part_method, self._rpc_part, replace=True)
            if self.declare:
                self._task = self._loop.create_task(self._declare_forever(), name=f"donor.{self.run_id}")
        return self

    async def close(self) -> None:
        self.endpoint.unregister(self.info_method)
        self.endpoint.unregister(self.part_method)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            try:  # withdraw: a newer declaration that says so
                await asyncio.wait_for(self._store(self.epoch_now(), get_dht_time() + self.expiration + 1.0, left=True), 2.0)
            except Exception:
                pass
        self._snapshots.clear()

    def epoch_changed(self) -> None:
        """Re-declare soon (thread-safe)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():  # called from a training thread: wake the loop's task
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # closed meanwhile
                pass

    async def _declare_forever(self) -> None:
        while True:
            epoch = self.epoch_now()
            if epoch != self._declared_epoch or get_dht_time() - self._declared_at >= self.expiration / 3:
                self._declared_epoch, self._declared_at = epoch, get_dht_time()
                await self._store(epoch, self._declared_at + self.expiration)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.expiration / 3)
            except asyncio.TimeoutError:
                pass

    async def _store(self, epoch: int, expiration_time: float, left: bool = False) -> None:
        try:
            await self.dht.store(self.key, {"addr": self.endpoint.address, "epoch": int(epoch), "left": left},
                                 expiration_time, subkey=self.subkey)
        except Exception as e:
            logger.debug("donor declaration failed: %r", e)

    async def _snapshot(self, epoch: int | None = None) -> tuple[int, dict[str, Any], list[tuple[str, torch.Tensor]]]:
        """The snapshot of ``epoch`` if this donor still has it, else of its current state."""
        async with self._snapshot_lock:
            now = time.monotonic()
            for old in [e for e, snap in self._snapshots.items() if now - snap[0] > self.snapshot_ttl]:
                del self._snapshots[old]
            if epoch is not None and epoch in self._snapshots:
                taken, meta, tensors = self._snapshots[epoch]
                return epoch, meta, tensors
            current = self.epoch_now()
            if current not in self._snapshots:
                loop = asyncio.get_running_loop()
                got_epoch, meta, tensors = await loop.run_in_executor(None, self.provider)
                self._snapshots[got_epoch] = (now, meta, tensors)
                for old in sorted(self._snapshots)[:-2]:  # keep two epochs at most
                    del self._snapshots[old]
                current = got_epoch
            taken, meta, tensors = self._snapshots[current]
            return current, meta, tensors

    async def _rpc_info(self, payload: Any, ctx: CallContext) -> dict[str, Any]:
        epoch, meta, tensors = await self._snapshot()
        return {"epoch": epoch, "meta": meta, "names": [n for n, _ in tensors],
                "shapes": [list(t.shape) for _, t in tensors], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in tensors]}

    async def _rpc_part(self, payload: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("indices"), list) or not isinstance(payload.get("epoch"), int):
            raise ValueError("state_part needs {'epoch': int, 'indices': [int, ...]}")
        epoch, _, tensors = await self._snapshot(payload["epoch"])
        if payload["epoch"] != epoch:
            raise ValueError(f"this donor is at epoch {epoch}, not {payload['epoch']}")
        indices = payload["indices"]
        if len(indices) > len(tensors) or not all(isinstance(i, int) and 0 <= i < len(tensors) for i in indices):
            raise ValueError("state_part: indices out of range")
        out = []
        for i in indices:
            t = tensors[i][1]
            codec = self.codec if t.is_floating_point() else NONE
            data, meta = await offload(codec.encode, t.contiguous(), numel=t.numel())
            out.append({"c": codec.name, "m": meta, "d": data})
        self.parts_served += 1
        return {"epoch": epoch, "tensors": out}


async def find_donors(dht: DHTNode, run_id: str, exclude: bytes | None = None) -> list[Donor]:
    """Donors with a live, owned, well-formed declaration, most advanced epoch first (shuffled within one)."""
    found = await dht.get(f"{run_id}_donors", latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    donors = []
    for subkey, item in found.value.items():
        owner = owner_of_subkey(subkey)
        if owner is None or getattr(item, "expiration_time", 0.0) <= now:
            continue
        try:
            record = DonorRecord.model_validate(getattr(item, "value", None))
        except ValidationError:
            continue
        peer_id = peer_id_from_public_key(owner)
        if peer_id != exclude and not record.left:
            donors.append(Donor(peer_id, record.addr, record.epoch))
    random.shuffle(donors)
    donors.sort(key=lambda d: -d.epoch)
    return donors


@dataclass
class DownloadedState:
    epoch: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    donors: list[bytes]  # the donors that sent a share
    failed_donors: int


def _parse_manifest(info: Any) -> tuple[int, dict[str, Any], list[str], list[tuple[int, ...]], list[torch.dtype]]:
    if not isinstance(info, dict) or not isinstance(info.get("epoch"), int) or not isinstance(info.get("meta"), dict):
        raise ValueError("a state manifest needs an epoch and metadata")
    names, shapes, dtypes = info.get("names"), info.get("shapes"), info.get("dtypes")
    if not (isinstance(names, list) and isinstance(shapes, list) and isinstance(dtypes, list)
            and len(names) == len(shapes) == len(dtypes) <= MAX_TENSORS):
        raise ValueError("a state manifest needs names, shapes and dtypes of equal length")
    parsed_dtypes = []
    for name, shape, dtype in zip(names, shapes, dtypes):
        if not isinstance(name, str) or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"bad manifest entry {name!r}")
        dt = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"bad dtype {dtype!r} for {name!r}")
        parsed_dtypes.append(dt)
    if len(set(names)) != len(names):
        raise ValueError("a state manifest names a tensor twice")
    return info["epoch"], info["meta"], names, [tuple(s) for s in shapes], parsed_dtypes


def _decode_tensor(wire: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(wire, dict) or not isinstance(wire.get("c"), str) or not isinstance(wire.get("m"), dict):
        raise ValueError("a state tensor needs a codec, metadata and data")
    data = wire.get("d")
    if not isinstance(data, torch.Tensor):
        raise ValueError("a state tensor carries no data")
    codec: Codec = get_codec(wire["c"])
    if codec is not NONE and not dtype.is_floating_point:
        raise ValueError("only floating point state may be compressed")
    out = codec.decode(data, wire["m"], dtype, shape)
    if tuple(out.shape) != shape or out.dtype != dtype:
        raise ValueError(f"expected {dtype} {list(shape)}, got {out.dtype} {list(out.shape)}")
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise ValueError("the tensor holds non-finite values")
    return out.clone()


async def download_state(endpoint: Endpoint, dht: DHTNode, run_id: str, *, timeout: float = 600.0,
                         max_donors: int = 4, min_epoch: int = 0, request_timeout: float = 60.0,
                         exclude: bytes | None = None, expect: Callable[[list[str], list[tuple[int, ...]],
                                                                         list[torch.dtype]], None] | None = None
                         ) -> DownloadedState:
    """Download the most advanced state from up to ``max_donors`` donors in parallel.

    ``expect(names, shapes, dtypes)`` may refuse a manifest (raise ValueError) before anything is downloaded:
    a donor whose state cannot fit this peer's model is passed over, however big it says its tensors are.

    Raises:
        StateUnavailable: no donor at ``min_epoch`` or later answered, or the download did not finish
            within ``timeout`` seconds after trying every tensor with every donor.
    """
    deadline = time.monotonic() + timeout
    donors = [d for d in await find_donors(dht, run_id, exclude=exclude) if d.epoch >= min_epoch]
    if not donors:
        raise StateUnavailable(f"no peer declares state for run {run_id!r} (at epoch >= {min_epoch})")
    info_method, part_method = f"optim.{run_id}.state_info", f"optim.{run_id}.state_part"
    manifest = None
    tried = 0
    passed_over: set[Donor] = set()
    for donor in donors:  # the most advanced donor that answers sets the epoch
        left = deadline - time.monotonic()
        if left <= 0:
            break
        tried += 1
        try:
            offered = _parse_manifest(await endpoint.call(donor.address, info_method, None, timeout=min(left, request_timeout)))
            if expect is not None:
                expect(*offered[2:])  # a manifest this peer cannot use passes the donor over
            manifest, answered = offered, donor
            break
        except (RPCError, ValueError) as e:
            passed_over.add(donor)
            logger.info("donor %s gave no usable manifest: %s", donor.peer_id.hex()[:8], e)
    if manifest is None:
        raise StateUnavailable(f"none of {tried} donors answered with a state manifest")
    epoch, meta, names, shapes, dtypes = manifest
    # the donor that answered, and others that declared this epoch or the one before (a donor's declaration
    # may lag its training by a moment; one that has moved on keeps the last epoch's snapshot for a while)
    pool = [answered] + [d for d in donors if d is not answered and d not in passed_over
                         and epoch - 1 <= d.epoch <= epoch][: max_donors - 1]
    pending = list(range(len(names)))
    results: dict[int, torch.Tensor] = {}
    attempts = dict.fromkeys(pending, 0)
    max_attempts = len(pool) + 1
    failed: set[bytes] = set()
    used: set[bytes] = set()

    async def fetch(donor: Donor, indices: list[int]) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StateUnavailable("out of time")
        answer = await endpoint.call(donor.address, part_method, {"epoch": epoch, "indices": indices},
                                     timeout=min(left, request_timeout))
        tensors = answer.get("tensors") if isinstance(answer, dict) else None
        if answer.get("epoch") != epoch or not isinstance(tensors, list) or len(tensors) != len(indices):
            raise ValueError("the donor's answer does not match the request")
        decoded = [_decode_tensor(w, shapes[i], dtypes[i]) for w, i in zip(tensors, indices)]
        for i, t in zip(indices, decoded):
            results[i] = t
        used.add(donor.peer_id)

    while pending:
        live = [d for d in pool if d.peer_id not in failed]
        if not live or time.monotonic() >= deadline:
            break
        shares = _split(pending, [int(torch.Size(shapes[i]).numel()) for i in range(len(names))], len(live))
        jobs = [(donor, share) for donor, share in zip(live, shares) if share]
        for _, share in jobs:
            for i in share:
                attempts[i] += 1
        outcomes = await asyncio.gather(*(fetch(d, s) for d, s in jobs), return_exceptions=True)
        for (donor, share), outcome in zip(jobs, outcomes):
            if isinstance(outcome, BaseException):
                logger.info("donor %s failed mid-download (%s); others take its share", donor.peer_id.hex()[:8], outcome)
                failed.add(donor.peer_id)
        pending = [i for i in pending if i not in results]
        if any(attempts[i] >= max_attempts for i in pending):
            break
    if pending:
        raise StateUnavailable(f"{len(pending)} of {len(names)} state tensors could not be downloaded "
                               f"({len(failed)} of {len(pool)} donors failed)")
    return DownloadedState(epoch, meta, {names[i]: results[i] for i in range(len(names))}, sorted(used), len(failed))


def _split(indices: Sequence[int], sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Indices dealt into ``parts`` shares of about equal total size (largest first, to the lightest share)."""
    shares: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in sorted(indices, key=lambda i: -sizes[i]):
        j = loads.index(min(loads))
        shares[j].append(i)
        loads[j] += max(1, sizes[i])
    return shares
