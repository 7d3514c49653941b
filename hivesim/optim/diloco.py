"""``hivesim.DiLoCoOptimizer``: low-communication training (DiLoCo and its streaming variant).

Each peer runs ``num_inner_steps`` steps of its own (inner) optimizer; then the peers that are ready
average their *pseudo-gradients* (synced parameters minus local parameters, weighted by samples) with the
butterfly all-reduce, and every peer applies the outer optimizer (Nesterov SGD by default) to its synced
copy, which it then trains from. The synced copy and the outer optimizer's state live on the host
(offloaded); a newcomer downloads them, not a peer's drifting local parameters.

``num_fragments = k > 1`` (Streaming DiLoCo) splits the parameters into k fragments of about equal size;
every ``num_inner_steps / k`` inner steps the next fragment is synced in a background thread while the
inner steps go on, and its outer update lands with the local progress made meanwhile kept. Every fragment
is synced once every ``num_inner_steps`` steps.

An outer round is an epoch of the swarm's progress tracker, so peers meet round by round, a peer that
misses a round trains on and joins the next, and one more than a round behind downloads the state.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch

from hivesim.averaging.averager import AveragerCore
from hivesim.optim.member import SwarmMember
from hivesim.optim.progress import ProgressTracker
from hivesim.averaging.state_sharing import StateServer
from hivesim.optim.training_state import (check_optimizer_state, check_params, from_skeleton, manifest_check,
                                          to_skeleton)

UNUSED_TARGET = 1 << 40  # the tracker's target: rounds are set by each peer's inner steps, not by a swarm target


def fragment_indices(sizes: Sequence[int], num_fragments: int) -> list[list[int]]:
    """Parameter indices in ``num_fragments`` contiguous fragments of about equal total size; every index is
    in exactly one fragment (an empty fragment only if there are fewer parameters than fragments)."""
    if num_fragments < 1:
        raise ValueError(f"num_fragments must be >= 1, got {num_fragments}")
    total, n = sum(sizes), len(sizes)
    fragments: list[list[int]] = [[] for _ in range(num_fragments)]
    f, done = 0, 0
    for i, size in enumerate(sizes):
        # next fragment once this one holds its share (by the parameter's middle), or when every parameter
        # left is needed to give each remaining fragment one
        if fragments[f] and f < num_fragments - 1 and (
                done + size / 2 > (f + 1) * total / num_fragments or n - i <= num_fragments - f - 1):
            f += 1
        fragments[f].append(i)
        done += size
    return fragments


class DiLoCoOptimizer(SwarmMember):
    """DiLoCo with hivemind-style arguments (OpenDiLoCo's shape).

    Args:
        dht: a running :class:`~hivesim.DHT` (or ``DHT.attach(...)``).
        run_id: the run's name (no dots).
        params: the model's parameters (or parameter groups).
        inner_optimizer: factory ``params -> torch.optim.Optimizer`` for the local steps (AdamW in the paper).
        outer_optimizer: factory for the outer step on the synced copy (default SGD lr 0.7, Nesterov 0.9).
        num_inner_steps: H, local steps between two syncs of the same fragment.
        batch_size_per_step: samples of one step (weights the average; or pass ``batch_size=`` to ``step``).
        scheduler: factory ``inner optimizer -> scheduler``, stepped on every inner step.
        matchmaking_time, averaging_timeout, allreduce_timeout: seconds; None adapts to the swarm.
        compression: codec of the pseudo-gradients on the wire (``"float16"``, ``"uniform8"``, ...).
        num_fragments: k > 1 streams the sync fragment by fragment, overlapped with the inner steps.
        client_mode: take part in rounds but serve nobody (behind NAT).
        load_state_timeout: seconds a state download may take.
    """

    def __init__(self, *, dht: Any, run_id: str, params: Iterable[Any],
                 inner_optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer],
                 outer_optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer] = partial(
                     torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True),
                 num_inner_steps: int, batch_size_per_step: int | None = None, scheduler: Any = None,
                 matchmaking_time: float | None = None, averaging_timeout: float | None = None,
                 allreduce_timeout: float | None = None, compression: Any = None, num_fragments: int = 1,
                 client_mode: bool | None = None, auxiliary: bool = False, load_state_timeout: float = 600.0,
                 averager_opts: dict[str, Any] | None = None, tracker_opts: dict[str, Any] | None = None,
                 shutdown_timeout: float = 5.0, verbose: bool = False) -> None:
        self._init_member(dht, run_id, load_state_timeout=load_state_timeout, averaging_timeout=averaging_timeout,
                          auxiliary=auxiliary, verbose=verbose)
        if auxiliary:
            raise ValueError("DiLoCoOptimizer has no auxiliary mode: a DiLoCo round averages what peers trained")
        if not isinstance(num_inner_steps, int) or num_inner_steps < 1:
            raise ValueError(f"num_inner_steps must be a positive int, got {num_inner_steps!r}")
        if not isinstance(num_fragments, int) or not 1 <= num_fragments <= num_inner_steps:
            raise ValueError(f"num_fragments must be an int in [1, num_inner_steps], got {num_fragments!r}")
        if batch_size_per_step is not None and batch_size_per_step <= 0:
            raise ValueError("batch_size_per_step must be positive")
        groups = list(params)
        if groups and isinstance(groups[0], dict):
            self.model_params = [p for g in groups for p in g["params"]]
        else:
            self.model_params = groups
        if not self.model_params:
            raise ValueError("no parameters to train")
        if num_fragments > len(self.model_params):
            raise ValueError(f"num_fragments ({num_fragments}) exceeds the number of parameter tensors ({len(self.model_params)})")
        node = dht.node
        self.client_mode = bool(getattr(node, "client_mode", False)) if client_mode is None else bool(client_mode)
        self.num_inner_steps = num_inner_steps
        self.num_fragments = num_fragments
        self.batch_size_per_step = batch_size_per_step
        self.shutdown_timeout = shutdown_timeout
        self.inner_opt = inner_optimizer(groups)
        self.scheduler = scheduler(self.inner_opt) if scheduler is not None else None
        self.synced = [torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True)) for p in self.model_params]
        self.outer_opt = outer_optimizer(self.synced)
        self.fragments = fragment_indices([p.numel() for p in self.model_params], num_fragments)
        self.inner_steps = 0  # since the start (or the downloaded state's position)
        self._samples = [0] * num_fragments  # since each fragment's last sync
        self._state_lock = threading.RLock()  # the synced copy and the outer optimizer
        self._background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"hivesim-diloco-{run_id}")
        self._pending: tuple[concurrent.futures.Future, int, list[torch.Tensor]] | None = None  # streaming round
        self._closed = False

        endpoint = node.endpoint
        common = dict(target_group_size=2, min_group_size=2, client_mode=self.client_mode, compression=compression,
                      matchmaking_time=matchmaking_time, allreduce_timeout=allreduce_timeout, **(averager_opts or {}))
        self.averagers = [AveragerCore(endpoint, node, [torch.zeros_like(self.synced[i]) for i in fragment],
                                       prefix=f"{run_id}_diloco_f{f}", **common)
                          for f, fragment in enumerate(self.fragments)]
        self.tracker = ProgressTracker(node, run_id, UNUSED_TARGET, client_mode=self.client_mode, **(tracker_opts or {}))
        self.state_server = StateServer(endpoint, node, run_id, self._state_for_donation, declare=not self.client_mode)
        self.state_server.epoch_now = lambda: self.local_epoch

        async def start() -> None:
            for core in self.averagers:
                await core.start()
            await self.tracker._fetch()
            await self.tracker.start()
            await self.state_server.start()

        self._run(start)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner_opt.param_groups

    @property
    def steps_per_round(self) -> int:
        return self.num_inner_steps // self.num_fragments

    # ------------------------------------------------------------------ training

    def step(self, closure: Callable[[], Any] | None = None, batch_size: int | None = None) -> Any:
        """One inner step on the model's gradients; at the end of a round, sync a fragment (or all)."""
        if self._closed:
            raise RuntimeError("the optimizer was shut down")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batch_size = batch_size if batch_size is not None else self.batch_size_per_step
        if batch_size is None or batch_size <= 0:
            raise ValueError("step() needs batch_size= or batch_size_per_step")
        self._apply_finished_round()
        if self._should_load_state():
            self._log("behind the swarm (round %d, global %d): loading state", self.local_epoch, self.global_epoch)
            self.load_state_from_peers()
            return loss
        self.inner_opt.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.inner_steps += 1
        self._samples = [s + batch_size for s in self._samples]
        self.tracker.report_local_progress(self.local_epoch, self._samples[self._fragment(self.local_epoch)],
                                           new_samples=batch_size)
        if self.inner_steps % self.steps_per_round == 0:
            self._sync_round()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner_opt.zero_grad(set_to_none=set_to_none)

    def _should_load_state(self) -> bool:
        """More than one outer step (k rounds) behind the swarm, or a newcomer to a swarm that moved on by
        more than that: with streaming, peers a few rounds apart are normal (rounds are H/k steps long)."""
        if time.monotonic() < self._next_load_attempt:
            return False
        first, self._checked_newcomer = not self._checked_newcomer, True
        behind = self.global_epoch - self.local_epoch
        return behind > self.num_fragments or (first and behind > self.num_fragments - 1 and behind > 0)

    def _fragment(self, round_index: int) -> int:
        return round_index % self.num_fragments

    def _sync_round(self) -> None:
        """Average the pseudo-gradient of this round's fragment and apply the outer step to it."""
        if self._pending is not None:
            self._finish_round(wait=True)  # the previous fragment's round must land first
        epoch = self.local_epoch
        f = self._fragment(epoch)
        weight, self._samples[f] = float(self._samples[f]), 0
        with torch.no_grad():
            local = [self.model_params[i].detach().to("cpu", torch.float32).clone() for i in self.fragments[f]]
        with self._state_lock:
            pseudo = [self.synced[i].detach() - mine for i, mine in zip(self.fragments[f], local)]
        core = self.averagers[f]
        with core.get_tensors() as tensors:
            for t, g in zip(tensors, pseudo):
                t.copy_(g)
        self.tracker.pause_throughput()
        expected, skip = self._plan_round(epoch, background=self.num_fragments > 1)
        if self.num_fragments > 1:  # streaming: the round runs while the inner steps go on
            future = self._background.submit(self._round, core, f, weight, epoch, expected, skip)
            self._pending = (future, f, local)
        else:
            self._round(core, f, weight, epoch, expected, skip)
            self._land(f, local)
        self.local_epoch = epoch + 1
        self.tracker.report_local_progress(self.local_epoch, self._samples[self._fragment(self.local_epoch)])
        self.state_server.epoch_changed()

    def _round(self, core: AveragerCore, f: int, weight: float, epoch: int, expected: int, skip: bool) -> None:
        started = time.monotonic()
        result = None if skip else self._averager_round(core, weight, epoch, expected)
        with core.get_tensors() as averaged, self._state_lock:  # (own pseudo-gradient if no group formed)
            for i, g in zip(self.fragments[f], averaged):
                self.synced[i].grad = g.clone()
            for i, p in enumerate(self.synced):
                if i not in self.fragments[f]:
                    p.grad = None  # only this fragment moves (optimizers skip parameters without gradients)
            self.outer_opt.step()
        self._record(epoch, int(weight), expected, result.group_size if result is not None else 0, started)

    def _land(self, f: int, local_at_launch: list[torch.Tensor]) -> None:
        """The model's fragment becomes the new synced values plus what it trained since the round began."""
        with self._state_lock, torch.no_grad():
            for i, before in zip(self.fragments[f], local_at_launch):
                p = self.model_params[i]
                progress = p.detach().to("cpu", torch.float32) - before
                p.copy_((self.synced[i].detach() + progress).to(p.device, p.dtype))

    def _finish_round(self, wait: bool) -> None:
        if self._pending is None or not (wait or self._pending[0].done()):
            return
        future, f, local = self._pending
        self._pending = None
        future.result()
        self._land(f, local)

    def _apply_finished_round(self) -> None:
        self._finish_round(wait=False)

    def _wait_pending_step(self) -> None:
        self._finish_round(wait=True)

    # ------------------------------------------------------------------ state for newcomers

    def _state_for_donation(self) -> tuple[int, dict[str, Any], list[tuple[str, torch.Tensor]]]:
        """The synced parameters and the outer optimizer's state (what a newcomer must start from)."""
        with self._state_lock:
            epoch = self.local_epoch
            named = [(f"param.{i}", p.detach().clone()) for i, p in enumerate(self.synced)]
            opt_tensors: list[torch.Tensor] = []
            skeleton = to_skeleton(self.outer_opt.state_dict(), opt_tensors)
        named += [(f"opt.{j}", t) for j, t in enumerate(opt_tensors)]
        return epoch, {"optimizer": skeleton, "inner_steps": self.inner_steps}, named

    def _manifest_check(self) -> Any:
        return manifest_check([p.detach() for p in self.synced])

    def _install_state(self, epoch: int, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        params = check_params(tensors, [p.detach() for p in self.synced], "param")
        opt_tensors: list[torch.Tensor] = []
        while f"opt.{len(opt_tensors)}" in tensors:
            opt_tensors.append(tensors[f"opt.{len(opt_tensors)}"])
        outer_state = check_optimizer_state(from_skeleton(meta.get("optimizer"), opt_tensors), self.outer_opt)
        with self._state_lock, torch.no_grad():
            for p, value in zip(self.synced, params):
                p.copy_(value)
            self.outer_opt.load_state_dict(outer_state)
            for p, value in zip(self.model_params, params):
                p.copy_(value.to(p.device, p.dtype))
        self.local_epoch = int(epoch)
        self.inner_steps = self.local_epoch * self.steps_per_round  # in step with the swarm's round schedule
        self._samples = [0] * self.num_fragments
        self.tracker.report_local_progress(self.local_epoch, 0)
        self.state_server.epoch_changed()

    # ------------------------------------------------------------------ lifecycle

    def _background_work(self) -> list[concurrent.futures.Future]:
        return [self._pending[0]] if self._pending is not None else []

    def _averager_cores(self) -> list[AveragerCore]:
        return list(self.averagers)

    def __repr__(self) -> str:
        return (f"DiLoCoOptimizer(run_id={self.run_id!r}, round={self.local_epoch}, H={self.num_inner_steps}, "
                f"fragments={self.num_fragments})")
