"""The batching runtime: one thread that pools requests for each expert into batches and runs them.

Requests arrive from the event loop (many clients at once); the runtime thread takes every request that
is waiting, groups them by (expert, forward|backward), and runs the group whose oldest request waited
longest as one batch of at most ``max_batch_size`` samples. Torch compute therefore never blocks the
event loop, and a busy expert runs large batches instead of many small ones. Backward recomputes the
forward pass (servers keep no activations between a client's forward and backward: the backward may
never come), back-propagates the pooled gradients and takes one optimizer step: experts train
asynchronously, as in learning@home.
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

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.module.to(self.device)

    def info(self) -> dict[str, Any]:
        return {"uid": self.uid, "expert_cls": self.expert_cls, "hidden_dim": self.hidden_dim,
                "sample_shape": list(self.sample_shape), "forwards": self.forwards, "backwards": self.backwards}

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

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


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
        if self._thread is None:
            raise RuntimeError("the runtime is not running")
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
            if task.future.set_running_or_notify_cancel():  # skip requests whose caller gave up
                batch.append(task)
                total += task.size
        if not tasks_waiting:
            del self._pending[key]
        if not batch:
            return
        uid, kind = key
        started = time.perf_counter()
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
            for task in batch:
                task.future.set_exception(e)
        else:
            for task, result in zip(batch, results):
                task.future.set_result(result)
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.samples += total
        self.stats.busy_seconds += time.perf_counter() - started

    def _forward(self, backend: ExpertBackend, batch: list[_Task]) -> list[torch.Tensor]:
        x = _join([t.tensors[0] for t in batch], backend.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            y = backend.module(x)
        _sync(backend.device)
        self.stats.compute_seconds += time.perf_counter() - t0
        backend.forwards += 1
        return _split(y, batch)

    def _backward(self, backend: ExpertBackend, batch: list[_Task]) -> list[torch.Tensor]:
        x = _join([t.tensors[0] for t in batch], backend.device)
        grad = _join([t.tensors[1] for t in batch], backend.device)
        t0 = time.perf_counter()
        with torch.enable_grad():
            x.requires_grad_(True)
            y = backend.module(x)
            if y.shape != grad.shape:
                raise ValueError(f"gradient has shape {tuple(grad.shape)}, the output {tuple(y.shape)}")
            torch.autograd.backward(y, grad)
        if backend.optimizer is not None:
            backend.optimizer.step()
            backend.optimizer.zero_grad(set_to_none=True)
        _sync(backend.device)
        self.stats.compute_seconds += time.perf_counter() - t0
        backend.backwards += 1
        return _split(x.grad, batch)


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
