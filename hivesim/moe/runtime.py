"""The batching runtime: one thread that pools requests for each expert into batches and runs them.

Requests arrive from the event loop (many clients at once); the runtime thread takes every request that
is waiting, groups them by (expert, forward|backward), and runs the group whose oldest request waited
longest as one batch of at most ``max_batch_size`` samples. Torch compute therefore never blocks the
event loop, and a busy expert runs large batches instead of many small ones. Backward recomputes the
forward pass (servers keep no activations between a client's forward and backward: the backward may
never come), back-propagates the pooled gradients and takes one optimizer step: experts train
asynchronously, as in learning@home.

Clients are not trusted. Each request is checked on its own before it joins a batch, so one bad request
fails only itself: its shape and dtype against the expert's schema when it is submitted (cheap, on the
event loop), its values (NaN/inf) in the runtime thread. After a pooled backward the parameter gradients
must be finite too (finite but huge inputs can still overflow); if they are not, the batch is redone one
request at a time and only the requests whose own gradients are finite are applied, so the expert's
parameters never take a non-finite step. Refused and skipped requests are counted in :class:`RuntimeStats`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when there is one, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ExpertBackend:
    """One hosted expert: its module, its optimizer and the shape of one input sample."""

    uid: str
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    sample_shape: tuple[int, ...]
    expert_cls: str = "custom"
    hidden_dim: int = 0
    device: torch.device = field(default_factory=default_device)
    forwards: int = 0
    backwards: int = 0
    # shape of one output row: the gradients the server accepts and the outputs clients accept. None: the
    # registered type's (see experts.output_shape), else the sample shape.
    output_shape: tuple[int, ...] | None = None
    # clip each applied backward's parameter gradient to this norm: finite but huge gradients (an
    # attacker's 1e20s) would otherwise blow SGD's parameters or Adam's second moment up to inf
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.module.to(self.device)
        self.sample_shape = tuple(int(d) for d in self.sample_shape)
        if self.output_shape is None:
            from hivesim.moe.experts import EXPERT_CLASSES, output_shape

            known = self.expert_cls in EXPERT_CLASSES and EXPERT_CLASSES[self.expert_cls].output_shape is not None
            self.output_shape = output_shape(self.expert_cls, self.hidden_dim) if known else self.sample_shape
        self.output_shape = tuple(int(d) for d in self.output_shape)

    def info(self) -> dict[str, Any]:
        return {"uid": self.uid, "expert_cls": self.expert_cls, "hidden_dim": self.hidden_dim,
                "sample_shape": list(self.sample_shape), "output_shape": list(self.output_shape or ()),
                "forwards": self.forwards, "backwards": self.backwards}

    def state(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "expert_cls": self.expert_cls, "hidden_dim": self.hidden_dim,
                "forwards": self.forwards, "backwards": self.backwards}

    def load_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.forwards, self.backwards = int(state.get("forwards", 0)), int(state.get("backwards", 0))


@dataclass
class _Task:
    kind: str  # "forward" | "backward" | "call"
    uid: str
    tensors: tuple[torch.Tensor, ...]
    size: int
    future: Future
    submitted: float
    fn: Callable[[], Any] | None = None  # for "call" tasks


@dataclass
class RuntimeStats:
    """What the runtime did. ``compute_seconds`` is time inside the experts' own forward/backward/step."""

    batches: int = 0
    samples: int = 0
    requests: int = 0
    compute_seconds: float = 0.0
    busy_seconds: float = 0.0  # compute plus batching (concatenate, split, device copies)
    errors: int = 0
    refused_requests: int = 0  # shape/dtype/size does not fit the expert: refused when submitted
    nonfinite_inputs: int = 0  # a request carrying NaN/inf (input or output gradient): refused before pooling
    nonfinite_gradients: int = 0  # a request whose own parameter gradients were NaN/inf: not applied
    isolated_batches: int = 0  # pooled backwards redone one request at a time to drop a non-finite one
    skipped_steps: int = 0  # backward batches with no finite contribution: no optimizer step

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class BadRequest(ValueError):
    """A request whose tensors do not fit the expert (shape, dtype, size): refused before it is queued."""


class NonFiniteRequest(ValueError):
    """A request with NaN/inf values, or whose gradients came out NaN/inf: refused, nothing applied."""


def check_request(kind: str, backend: ExpertBackend, tensors: tuple[torch.Tensor, ...], max_rows: int | None = None) -> None:
    """Raise unless ``tensors`` fit ``backend``'s schema, so a request that could not be pooled never is.

    Forward: ``(x,)``; backward: ``(x, grad_output)``. Only metadata is read (cheap on the event loop);
    the values are checked in the runtime thread. A gradient of the wrong shape raises a plain ValueError
    (what servers answered before this check moved ahead of pooling)."""
    want = {"forward": 1, "backward": 2}.get(kind)
    if want is None or len(tensors) != want or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise BadRequest(f"a {kind} request takes {want} tensors")
    x = tensors[0]
    if not x.is_floating_point():
        raise BadRequest(f"the input must be a floating point tensor, got {x.dtype}")
    if x.dim() != 1 + len(backend.sample_shape) or tuple(x.shape[1:]) != backend.sample_shape:
        raise BadRequest(f"the input must have shape [batch, {', '.join(map(str, backend.sample_shape))}], "
                         f"got {list(x.shape)}")
    rows = int(x.shape[0])
    if rows < 1 or (max_rows is not None and rows > max_rows):
        raise BadRequest(f"a request carries 1..{max_rows or 'any'} samples, got {rows}")
    if kind == "backward":
        g = tensors[1]
        if not g.is_floating_point():
            raise BadRequest(f"the output gradient must be a floating point tensor, got {g.dtype}")
        expected = (rows, *(backend.output_shape or backend.sample_shape))
        if tuple(g.shape) != expected:
            raise ValueError(f"gradient has shape {tuple(g.shape)}, the output {expected}")


def all_finite(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> bool:
    """True when every value of every tensor is finite (one device sync for all of them)."""
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class Runtime:
    """Runs the experts of one server in a dedicated thread, batching concurrent requests.

    Args:
        backends: ``{uid: ExpertBackend}``.
        max_batch_size: most samples in one batch (a single larger request still runs, alone).
    """

    def __init__(self, backends: dict[str, ExpertBackend], max_batch_size: int = 4096) -> None:
        self.backends = backends
        self.max_batch_size = max_batch_size
        self.stats = RuntimeStats()
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pending: dict[tuple[str, str], deque[_Task]] = {}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hivesim-moe-runtime", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None

    # ------------------------------------------------------------------ submitting (any thread)

    def submit(self, kind: str, uid: str, *tensors: torch.Tensor) -> Future:
        """Queue one request; raises :class:`BadRequest` (or ValueError) at once if it does not fit the expert."""
        if self._thread is None:
            raise RuntimeError("the runtime is not running")
        backend = self.backends.get(uid)
        if backend is None:
            raise KeyError(f"no expert {uid!r} on this server")
        try:
            check_request(kind, backend, tensors)
        except ValueError:
            self.stats.refused_requests += 1
            raise
        future: Future = Future()
        size = int(tensors[0].shape[0]) if tensors else 0
        self._queue.put(_Task(kind, uid, tensors, size, future, time.perf_counter()))
        return future

    async def forward(self, uid: str, x: torch.Tensor) -> torch.Tensor:
        return await asyncio.wrap_future(self.submit("forward", uid, x))

    async def backward(self, uid: str, x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        return await asyncio.wrap_future(self.submit("backward", uid, x, grad_output))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the runtime thread between batches (e.g. copying a state dict safely)."""
        if self._thread is None:
            return fn()
        future: Future = Future()
        self._queue.put(_Task("call", "", (), 0, future, time.perf_counter(), fn))
        return await asyncio.wrap_future(future)

    # ------------------------------------------------------------------ the runtime thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            try:  # block only when nothing is waiting to run
                task = self._queue.get_nowait() if self._pending else self._queue.get()
            except queue.Empty:
                pass
            else:
                if task is None:
                    break
                self._add(task)
            while True:  # take everything that is waiting, then pick a batch
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._fail_pending("the runtime was stopped")
                    return
                self._add(more)
            self._run_one_batch()
        self._fail_pending("the runtime was stopped")

    def _add(self, task: _Task) -> None:
        if task.kind == "call":
            if task.future.set_running_or_notify_cancel():
                try:
                    task.future.set_result(task.fn())  # type: ignore[misc]
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    task.future.set_exception(e)
            return
        self._pending.setdefault((task.uid, task.kind), deque()).append(task)

    def _fail_pending(self, reason: str) -> None:
        for tasks in self._pending.values():
            for task in tasks:
                if task.future.set_running_or_notify_cancel():
                    task.future.set_exception(RuntimeError(reason))
        self._pending.clear()

    def _run_one_batch(self) -> None:
        if not self._pending:
            return
        key = min(self._pending, key=lambda k: self._pending[k][0].submitted)
        tasks_waiting = self._pending[key]
        batch: list[_Task] = []
        total = 0
        while tasks_waiting and (not batch or total + tasks_waiting[0].size <= self.max_batch_size):
            task = tasks_waiting.popleft()
            if not task.future.set_running_or_notify_cancel():  # skip requests whose caller gave up
                continue
            if not all_finite(task.tensors):  # one poisoned request must not reach the others' batch
                self.stats.nonfinite_inputs += 1
                self.stats.requests += 1
                task.future.set_exception(NonFiniteRequest(f"the {task.kind} request carries NaN or inf values"))
                continue
            batch.append(task)
            total += task.size
        if not tasks_waiting:
            del self._pending[key]
        if not batch:
            return
        uid, kind = key
        started = time.perf_counter()
        results: list[Any]
        try:
            backend = self.backends.get(uid)
            if backend is None:
                raise KeyError(f"no expert {uid!r} on this server")
            if kind == "forward":
                results = self._forward(backend, batch)
            else:
                results = self._backward(backend, batch)
        except BaseException as e:  # noqa: BLE001 - an expert failing must not stop the runtime
            self.stats.errors += 1
            logger.debug("expert %s %s failed", uid, kind, exc_info=True)
            results = [e] * len(batch)
        # stats first: a caller woken by its result must find them counted
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.samples += total
        self.stats.busy_seconds += time.perf_counter() - started
        for task, result in zip(batch, results):
            if isinstance(result, BaseException):
                task.future.set_exception(result)
            else:
                task.future.set_result(result)

    def _forward(self, backend: ExpertBackend, batch: list[_Task]) -> list[torch.Tensor]:
        x = _join([t.tensors[0] for t in batch], backend.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            y = backend.module(x)
        _sync(backend.device)
        self.stats.compute_seconds += time.perf_counter() - t0
        backend.forwards += 1
        return _split(y, batch)

    def _backward(self, backend: ExpertBackend, batch: list[_Task]) -> list[torch.Tensor | BaseException]:
        """Pooled backward and one optimizer step; a batch whose gradients came out non-finite is redone
        request by request (:meth:`_backward_each`) so that only finite contributions are applied."""
        x = _join([t.tensors[0] for t in batch], backend.device)
        grad = _join([t.tensors[1] for t in batch], backend.device)
        params = [p for p in backend.module.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        for p in params:  # gradients left by anyone else must not be applied with ours
            p.grad = None
        with torch.enable_grad():
            x.requires_grad_(True)
            y = backend.module(x)
            if y.shape != grad.shape:
                raise ValueError(f"gradient has shape {tuple(grad.shape)}, the output {tuple(y.shape)}")
            torch.autograd.backward(y, grad)
        if all_finite([x.grad, *(p.grad for p in params)]):
            results: list[torch.Tensor | BaseException] = list(_split(x.grad, batch))
            self._step(backend, params, True)
        else:
            results = self._backward_each(backend, batch, params)
        _sync(backend.device)
        self.stats.compute_seconds += time.perf_counter() - t0
        return results

    def _backward_each(self, backend: ExpertBackend, batch: list[_Task],
                       params: list[nn.Parameter]) -> list[torch.Tensor | BaseException]:
        """Redo a pooled backward one request at a time, summing only the finite parameter gradients."""
        self.stats.isolated_batches += 1
        refused = NonFiniteRequest("this request's gradients came out NaN or inf; it was not applied")
        if len(batch) == 1:  # nothing to separate: the one request is the bad one
            self.stats.nonfinite_gradients += 1
            self._step(backend, params, False)
            return [refused]
        total: list[torch.Tensor | None] = [None] * len(params)
        results: list[torch.Tensor | BaseException] = []
        for task in batch:
            for p in params:
                p.grad = None
            x = task.tensors[0].to(backend.device).requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.backward(backend.module(x), task.tensors[1].to(backend.device))
            grads = [p.grad for p in params]
            if not all_finite([x.grad, *grads]):
                self.stats.nonfinite_gradients += 1
                results.append(refused)
                continue
            total = [t if g is None else (g if t is None else t + g) for t, g in zip(total, grads)]
            results.append(_split(x.grad, [task])[0])
        for p, g in zip(params, total):
            p.grad = g
        self._step(backend, params, any(not isinstance(r, BaseException) for r in results))
        return results

    def _step(self, backend: ExpertBackend, params: list[nn.Parameter], apply: bool) -> None:
        """Take the optimizer step (or count a skipped one), then drop the gradients either way."""
        if backend.optimizer is not None:
            if apply:
                if backend.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], backend.max_grad_norm)
                backend.optimizer.step()
            backend.optimizer.zero_grad(set_to_none=True)
        if apply:
            backend.backwards += 1  # backward batches applied
        else:
            self.stats.skipped_steps += 1
        for p in params:
            p.grad = None


def _join(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    joined = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    return joined.to(device, non_blocking=True)


def _split(out: torch.Tensor, batch: list[_Task]) -> list[torch.Tensor]:
    out = out.detach()
    if out.device.type != "cpu":
        out = out.cpu()
    if len(batch) == 1:
        return [out]
    return list(out.split([t.size for t in batch]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
