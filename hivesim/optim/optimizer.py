"""``hivesim.Optimizer``: train one model together with whoever is in the swarm (hivemind's API).

Wrap a ``torch.optim`` optimizer; call ``opt.step()`` after every local ``backward()``. Peers accumulate
gradients until the swarm as a whole has processed ``target_batch_size`` samples (progress goes through
the DHT, see :mod:`hivesim.optim.progress`), then all-reduce the sample-weighted mean gradient with the
peers that are ready, apply one optimizer step with it and move to the next epoch together: the same
step a single machine would take on the union of everyone's batches. Every ``average_state_every``
epochs the parameters (and the named optimizer statistics) are averaged too, so a peer that missed a
round comes back; a peer more than one epoch behind, or a newcomer, downloads the state from donors.

``use_local_updates=True`` steps on every local batch and averages parameters once per epoch instead.
``delay_optimizer_step`` / ``delay_grad_averaging`` move the step (and the averaging) to a background
thread while the next batches compute on parameters at most one epoch stale.

Threads: the network side (tracker, averagers, state server) runs in the DHT's event loop; the training
loop calls the blocking methods from its own thread; torch compute never runs in the event loop.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from hivesim.averaging.averager import AveragerCore, StepResult
from hivesim.optim.member import CONFIRM_READ_AGE, SwarmMember, logger
from hivesim.optim.progress import ProgressTracker
from hivesim.averaging.state_sharing import StateServer
from hivesim.optim.training_state import (check_optimizer_state, check_params, from_skeleton, manifest_check,
                                          to_skeleton)


OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class Optimizer(SwarmMember):
    """A collaborative optimizer with ``hivemind.Optimizer``'s public API.

    Args:
        dht: a running :class:`~hivesim.DHT` (or ``DHT.attach(node, loop)`` of a :class:`~hivesim.Peer`).
        run_id: the run's name; peers with the same run id train together (no dots).
        target_batch_size: samples the swarm accumulates per epoch (one optimizer step).
        batch_size_per_step: samples of one local ``step()`` (or pass ``batch_size=`` to each step).
        optimizer: a factory ``params -> torch.optim.Optimizer`` (e.g. ``partial(torch.optim.AdamW, lr=1e-3)``)
            or an optimizer instance (then ``params`` must be None).
        params: the parameters (or parameter groups) to train, for a factory.
        scheduler: a factory ``optimizer -> LR scheduler``, stepped once per global epoch.
        matchmaking_time, allreduce_timeout: seconds; None adapts them to the measured swarm.
        averaging_timeout: seconds one whole averaging round may take (None: matchmaking + all-reduce budget).
        load_state_timeout: seconds a state download may take.
        use_local_updates: step on every local batch, average parameters every epoch.
        delay_optimizer_step: run the optimizer step in the background (needs an offloaded optimizer).
        delay_grad_averaging: average gradients in the background too (implies ``delay_optimizer_step``).
        delay_state_averaging: average parameters in the background, applying the change when it lands.
        offload_optimizer: the optimizer works on a host-memory copy of the parameters (default: when
            the step is delayed).
        reuse_grad_buffers: accumulate in ``param.grad`` itself (do not call ``zero_grad`` between steps).
        average_state_every: average parameters every this many epochs (0: never).
        average_opt_statistics: names of optimizer state entries averaged with the parameters (``"exp_avg_sq"``).
        extra_tensors: more tensors averaged with the parameters and sent to newcomers.
        grad_compression, state_averaging_compression, load_state_compression: codecs (``"float16"``...).
        aggregation: how this peer reduces its parts of every averaging round: ``"mean"`` (default, hivemind's)
            or a Byzantine-robust rule (``"centered_clip"``, ``"trimmed_mean"``, ``"median"`` or an
            :class:`hivesim.averaging.robust.Aggregation`); every peer of a run should use the same.
        client_mode: take part but serve nobody (behind NAT); default: the DHT's mode.
        auxiliary: help reduce gradients, contribute none (no ``batch_size_per_step``).
        averager_opts: more :class:`~hivesim.averaging.AveragerCore` options (``bandwidth``, ``request_timeout``...).
        tracker_opts: more :class:`~hivesim.optim.ProgressTracker` options.
        shutdown_timeout: seconds :meth:`shutdown` waits for background work.
        verbose: log every epoch transition at INFO level.

    Example::

        dht = hivesim.DHT(initial_peers=peers)
        opt = hivesim.Optimizer(dht=dht, run_id="my_run", target_batch_size=4096, batch_size_per_step=32,
                                optimizer=partial(torch.optim.Adam, lr=1e-3), params=model.parameters())
        for x, y in batches:
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    """

    def __init__(self, *, dht: Any, run_id: str, target_batch_size: int, batch_size_per_step: int | None = None,
                 optimizer: OptimizerFactory | torch.optim.Optimizer, params: Iterable[Any] | None = None,
                 scheduler: SchedulerFactory | None = None, matchmaking_time: float | None = None,
                 averaging_timeout: float | None = None, allreduce_timeout: float | None = None,
                 load_state_timeout: float = 600.0, use_local_updates: bool = False,
                 delay_optimizer_step: bool | None = None, delay_grad_averaging: bool = False,
                 delay_state_averaging: bool = True, offload_optimizer: bool | None = None,
                 reuse_grad_buffers: bool = False, average_state_every: int = 1,
                 average_opt_statistics: Sequence[str] = (), extra_tensors: Sequence[torch.Tensor] = (),
                 grad_compression: Any = None, state_averaging_compression: Any = None,
                 load_state_compression: Any = None, client_mode: bool | None = None, auxiliary: bool = False,
                 averager_opts: dict[str, Any] | None = None, tracker_opts: dict[str, Any] | None = None,
                 aggregation: Any = None, shutdown_timeout: float = 5.0, verbose: bool = False) -> None:
        self._init_member(dht, run_id, load_state_timeout=load_state_timeout, averaging_timeout=averaging_timeout,
                          auxiliary=auxiliary, verbose=verbose)
        if not isinstance(target_batch_size, int) or target_batch_size <= 0:
            raise ValueError(f"target_batch_size must be a positive int, got {target_batch_size!r}")
        if batch_size_per_step is not None and (not isinstance(batch_size_per_step, int) or batch_size_per_step <= 0):
            raise ValueError(f"batch_size_per_step must be a positive int or None, got {batch_size_per_step!r}")
        if auxiliary and batch_size_per_step is not None:
            raise ValueError("an auxiliary peer contributes no samples: leave batch_size_per_step unset")
        if delay_grad_averaging and delay_optimizer_step is False:
            raise ValueError("delay_grad_averaging needs delay_optimizer_step (the step waits for the averaging)")
        if use_local_updates and (delay_grad_averaging or delay_optimizer_step):
            raise ValueError("use_local_updates steps on every batch: it cannot delay the optimizer step")
        if average_state_every < 0:
            raise ValueError("average_state_every must be >= 0")
        delay_optimizer_step = bool(delay_optimizer_step or delay_grad_averaging)
        if offload_optimizer is False and delay_optimizer_step:
            raise ValueError("a delayed optimizer step needs offload_optimizer (it steps a copy while you compute)")
        offload_optimizer = delay_optimizer_step if offload_optimizer is None else bool(offload_optimizer)
        node = dht.node
        if client_mode is None:
            client_mode = bool(getattr(node, "client_mode", False))
        if client_mode and auxiliary:
            raise ValueError("a peer cannot be both client_mode and auxiliary")

        self.target_batch_size = target_batch_size
        self.batch_size_per_step = batch_size_per_step
        self.use_local_updates = use_local_updates
        self.delay_optimizer_step = delay_optimizer_step
        self.delay_grad_averaging = delay_grad_averaging
        self.delay_state_averaging = delay_state_averaging
        self.offload_optimizer = offload_optimizer
        self.reuse_grad_buffers = reuse_grad_buffers
        self.average_state_every = average_state_every
        self.average_opt_statistics = tuple(average_opt_statistics)
        self.client_mode = client_mode
        self.shutdown_timeout = shutdown_timeout

        # --- the model's parameters and the optimizer over them (or over an offloaded copy)
        if isinstance(optimizer, torch.optim.Optimizer):
            if params is not None:
                raise ValueError("pass params only with an optimizer factory; an optimizer instance has its own")
            self.opt = optimizer
            self.model_params = [p for g in optimizer.param_groups for p in g["params"]]
            if offload_optimizer:
                if optimizer.state:
                    raise ValueError("offloading needs an optimizer that has not stepped yet")
                copies = {id(p): self._offloaded(p) for p in self.model_params}
                for group in optimizer.param_groups:
                    group["params"] = [copies[id(p)] for p in group["params"]]
        elif callable(optimizer):
            if params is None:
                raise ValueError("an optimizer factory needs params=model.parameters()")
            groups = list(params)
            if groups and isinstance(groups[0], dict):
                self.model_params = [p for g in groups for p in g["params"]]
                if offload_optimizer:
                    copies = {id(p): self._offloaded(p) for p in self.model_params}
                    groups = [{**g, "params": [copies[id(p)] for p in g["params"]]} for g in groups]
            else:
                self.model_params = groups
                if offload_optimizer:
                    groups = [self._offloaded(p) for p in groups]
            self.opt = optimizer(groups)
        else:
            raise TypeError(f"optimizer must be a factory or a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not self.model_params:
            raise ValueError("no parameters to train")
        self.main_params = [p for g in self.opt.param_groups for p in g["params"]]  # what the optimizer steps
        self.scheduler = scheduler(self.opt) if scheduler is not None else None
        self.extra_tensors = list(extra_tensors)

        self.local_samples = 0  # this epoch
        self._local_steps = 0
        self._grad_acc = None if (use_local_updates or auxiliary or reuse_grad_buffers) else \
            [torch.zeros_like(p, dtype=torch.float32, device="cpu") for p in self.model_params]
        self._state_lock = threading.RLock()  # main params, optimizer state, extra tensors
        self._background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"hivesim-opt-{run_id}")
        self._pending_step: concurrent.futures.Future | None = None  # a delayed step (and averaging)
        self._pending_state: tuple[concurrent.futures.Future, list[torch.Tensor]] | None = None  # state averaging
        self._closed = False
        self._averager_opts = dict(averager_opts or {})
        if aggregation is not None:
            from hivesim.averaging.robust import Aggregation

            self._averager_opts["aggregation"] = Aggregation.of(aggregation)
        self._matchmaking_time, self._allreduce_timeout = matchmaking_time, allreduce_timeout
        self._state_codec = state_averaging_compression
        self._state_core: AveragerCore | None = None

        endpoint = node.endpoint
        tensors = [torch.zeros_like(p, dtype=torch.float32, device="cpu") for p in self.model_params]
        common = dict(target_group_size=2, min_group_size=2, client_mode=client_mode,
                      matchmaking_time=matchmaking_time, allreduce_timeout=allreduce_timeout, **self._averager_opts)
        self.grad_averager = AveragerCore(endpoint, node, tensors, prefix=f"{run_id}_grads", auxiliary=auxiliary,
                                          compression=grad_compression, **common)
        self.tracker = ProgressTracker(node, run_id, target_batch_size, client_mode=client_mode, auxiliary=auxiliary,
                                       **(tracker_opts or {}))
        self.state_server = StateServer(endpoint, node, run_id, self._state_for_donation, compression=load_state_compression,
                                        declare=not (client_mode or auxiliary))
        self.state_server.epoch_now = lambda: self.local_epoch

        if not auxiliary and not self.average_opt_statistics and (use_local_updates or average_state_every):
            # registered up front: a peer whose state averager appeared only at its first round would refuse the
            # join requests of faster peers (optimizer statistics exist only after a step: those start lazily)
            self._state_averager(self._state_tensors(), start=False)

        async def start() -> None:
            if self._state_core is not None:
                await self._state_core.start()
            await self.grad_averager.start()
            await self.tracker._fetch()  # know the swarm before the first step
            await self.tracker.start()
            await self.state_server.start()

        self._run(start)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _offloaded(p: torch.Tensor) -> torch.Tensor:
        copy = torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
        copy.grad = torch.zeros_like(copy)
        return copy



    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.opt.param_groups

    # ------------------------------------------------------------------ the training step

    def step(self, closure: Callable[[], Any] | None = None, batch_size: int | None = None,
             grad_scaler: Any = None) -> Any:
        """Take this batch's gradients into account; at the swarm's target, average and step (blocking).

        Returns ``closure()``'s loss if a closure was given.
        """
        if self._closed:
            raise RuntimeError("the optimizer was shut down")
        if grad_scaler is not None:
            raise NotImplementedError("grad_scaler is not supported; unscale before step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batch_size = batch_size if batch_size is not None else self.batch_size_per_step
        if not self.auxiliary and (batch_size is None or batch_size <= 0):
            raise ValueError("step() needs batch_size= or batch_size_per_step")
        self._apply_background_results()
        if self._should_load_state():
            self._log("behind the swarm (local epoch %d, global %d): loading state from peers",
                      self.local_epoch, self.global_epoch)
            self._catch_up()
            return loss
        if self.auxiliary:
            self._auxiliary_step()
            return loss
        if self.use_local_updates:
            with self._state_lock:
                self._copy_grads_to_main()
                self.opt.step()
                self._main_to_model()
        else:
            self._accumulate(batch_size)
        self.local_samples += batch_size
        self._local_steps += 1
        self.tracker.report_local_progress(self.local_epoch, self.local_samples, new_samples=batch_size)
        if self._ready_to_update_epoch():
            self._update_epoch()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients (a no-op with ``reuse_grad_buffers``, whose buffers hold the sum)."""
        if self.reuse_grad_buffers:
            return
        for p in self.model_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def _ready_to_update_epoch(self) -> bool:
        """The tracker says the target is reached, confirmed by a fresh read when its view is old (peers that
        started together may not have seen each other yet)."""
        if not self.tracker.ready_to_update_epoch():
            return False
        if self.tracker.staleness > CONFIRM_READ_AGE:
            self._run(self.tracker.refresh)
            return self.tracker.ready_to_update_epoch()
        return True

    def _accumulate(self, batch_size: int) -> None:
        assert self._grad_acc is not None
        for acc, p in zip(self._grad_acc, self.model_params):
            if p.grad is not None:
                acc.add_(p.grad.detach().to(acc.device, torch.float32), alpha=float(batch_size))

    def _local_mean_grads(self) -> list[torch.Tensor]:
        """This epoch's sample-weighted mean gradient."""
        if self.reuse_grad_buffers:  # param.grad holds the sum of per-step mean gradients
            steps = max(1, self._local_steps)
            return [(p.grad.detach().float() / steps) if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                    for p in self.model_params]
        assert self._grad_acc is not None
        samples = max(1, self.local_samples)
        return [acc / samples for acc in self._grad_acc]

    def _reset_accumulators(self) -> None:
        if self._grad_acc is not None:
            for acc in self._grad_acc:
                acc.zero_()
        if self.reuse_grad_buffers:
            for p in self.model_params:
                p.grad = None
        self.local_samples = 0
        self._local_steps = 0

    def _copy_grads_to_main(self, grads: Sequence[torch.Tensor | None] | None = None) -> None:
        """Put ``grads`` (default: the model's ``.grad``) where the optimizer reads them."""
        if grads is None:
            grads = [p.grad for p in self.model_params]
        for main, g in zip(self.main_params, grads):
            if g is None:
                main.grad = None
                continue
            g = g.detach().to(main.device, main.dtype)
            if main.grad is None or main.grad.shape != g.shape:
                main.grad = g.clone()
            elif main.grad is not g:
                main.grad.copy_(g)

    def _main_to_model(self) -> None:
        if self.offload_optimizer:
            with torch.no_grad():
                for main, p in zip(self.main_params, self.model_params):
                    p.copy_(main.to(p.device, p.dtype))

    # ------------------------------------------------------------------ epoch transitions

    def _update_epoch(self) -> None:
        started = time.monotonic()
        self.tracker.pause_throughput()
        epoch, samples = self.local_epoch, self.local_samples
        expected, swarm_moved_on = self._plan_round(epoch, background=self.delay_grad_averaging)
        if self.use_local_updates:
            result = self._average_state(weight=float(samples), epoch=epoch, expected=expected, skip=swarm_moved_on)
            averaged_with = result.group_size if result is not None else 0
        elif self.delay_grad_averaging:
            self._wait_pending_step()
            self._load_grad_averager(self._local_mean_grads())
            self._reset_accumulators()
            self._pending_step = self._background.submit(self._average_then_step, float(samples), epoch, expected,
                                                         swarm_moved_on)
            averaged_with = -1  # known when the background round ends
        else:
            self._load_grad_averager(self._local_mean_grads())
            result = None if swarm_moved_on else self._average_grads(float(samples), epoch, expected)
            averaged_with = result.group_size if result is not None else 0
            self._reset_accumulators()
            if self.delay_optimizer_step:
                self._wait_pending_step()
                self._pending_step = self._background.submit(self._step_from_averager)
            else:
                self._step_from_averager()
        self._advance_epoch(epoch + 1)
        if averaged_with >= 0:
            self._record(epoch, samples, expected, averaged_with, started)
        if not self.use_local_updates and self.average_state_every and self.local_epoch % self.average_state_every == 0:
            self._average_state_in_turn(epoch)


    def _advance_epoch(self, new_epoch: int) -> None:
        steps = new_epoch - self.local_epoch
        self.local_epoch = new_epoch
        if self.scheduler is not None:
            with self._state_lock:
                for _ in range(max(0, steps)):
                    self.scheduler.step()
        self.tracker.report_local_progress(self.local_epoch, self.local_samples)
        self.state_server.epoch_changed()

    def _load_grad_averager(self, grads: Sequence[torch.Tensor]) -> None:
        with self.grad_averager.get_tensors() as tensors:
            for t, g in zip(tensors, grads):
                t.copy_(g)


    def _average_grads(self, weight: float, epoch: int, expected: int) -> StepResult | None:
        return self._averager_round(self.grad_averager, 0.0 if self.auxiliary else weight, epoch, expected)

    def _step_from_averager(self) -> None:
        """One optimizer step with the (averaged) gradients held by the gradient averager."""
        with self.grad_averager.get_tensors() as grads:
            with self._state_lock:
                self._copy_grads_to_main(grads)
                self.opt.step()
                if not self.delay_optimizer_step:
                    self._main_to_model()

    def _average_then_step(self, weight: float, epoch: int, expected: int, skip: bool) -> None:
        started = time.monotonic()
        result = None if skip or expected < 2 else self._average_grads(weight, epoch, expected)
        self._step_from_averager()
        self._record(epoch, int(weight), expected, result.group_size if result is not None else 0, started)

    def _wait_pending_step(self) -> None:
        pending, self._pending_step = self._pending_step, None
        if pending is not None:
            pending.result()
            self._main_to_model()

    def _auxiliary_step(self) -> None:
        """An auxiliary peer waits for the swarm's next transition and helps reduce it."""
        deadline = time.monotonic() + (self.averaging_timeout or 60.0)
        while not self._ready_to_update_epoch() and time.monotonic() < deadline:
            if self.global_epoch > self.local_epoch:
                break
            time.sleep(min(0.05, max(0.0, self.tracker.global_progress.next_fetch_time - self.tracker.global_progress.time)))
            self.tracker.request_refresh()
        if self.global_epoch > self.local_epoch:
            self._advance_epoch(self.global_epoch)  # nothing to help with at an epoch that is over
            return
        if not self.tracker.ready_to_update_epoch():
            return
        started, epoch = time.monotonic(), self.local_epoch
        expected = self.tracker.peers_at(epoch)
        result = self._average_grads(0.0, epoch, expected) if expected >= 2 else None
        self._advance_epoch(epoch + 1)
        self._record(epoch, 0, expected, result.group_size if result is not None else 0, started)

    # ------------------------------------------------------------------ parameter (state) averaging

    def _state_tensors(self) -> list[torch.Tensor]:
        """What state averaging averages, in a fixed order: parameters, named statistics, extra tensors."""
        tensors = list(self.main_params)
        for name in self.average_opt_statistics:
            for p in self.main_params:
                value = self.opt.state.get(p, {}).get(name)
                if not isinstance(value, torch.Tensor):
                    raise KeyError(f"average_opt_statistics names {name!r}, which {type(self.opt).__name__} does not "
                                   f"keep for every parameter (it keeps: {sorted(self.opt.state.get(p, {}))})")
                tensors.append(value)
        return tensors + self.extra_tensors

    def _state_averager(self, tensors: Sequence[torch.Tensor], start: bool = True) -> AveragerCore:
        if self._state_core is None:
            node = self.dht.node
            core = AveragerCore(node.endpoint, node, [t.detach().float() for t in tensors], prefix=f"{self.run_id}_state",
                                target_group_size=2, min_group_size=2, client_mode=self.client_mode,
                                compression=self._state_codec, matchmaking_time=self._matchmaking_time,
                                allreduce_timeout=self._allreduce_timeout, **self._averager_opts)
            if start:
                self._run(core.start)
            self._state_core = core
        return self._state_core

    def _average_state_in_turn(self, epoch: int) -> None:
        expected = self.tracker.peers_at(self.local_epoch) if self.global_epoch <= self.local_epoch else 0
        if self.auxiliary or expected < 2:
            return
        if self.delay_state_averaging:
            if self._pending_state is not None:
                return  # the previous round is still running: skip this one
            with self._state_lock:
                snapshot = [t.detach().float().clone() for t in self._state_tensors()]
            future = self._background.submit(self._average_state_tensors, snapshot, 1.0, self.local_epoch, expected)
            self._pending_state = (future, snapshot)
        else:
            self._average_state(1.0, self.local_epoch, expected)

    def _average_state_tensors(self, snapshot: list[torch.Tensor], weight: float, epoch: int, expected: int) -> list[torch.Tensor] | None:
        core = self._state_averager(snapshot)
        with core.get_tensors() as tensors:
            for t, s in zip(tensors, snapshot):
                t.copy_(s)
        result = self._averager_round(core, weight, epoch, expected)
        if result is None:
            return None
        with core.get_tensors() as tensors:
            return [t.clone() for t in tensors]

    def _average_state(self, weight: float, epoch: int, expected: int, skip: bool = False) -> StepResult | None:
        """Average parameters (and statistics) now; with local updates the weight is this epoch's samples."""
        if skip or expected < 2 or self.auxiliary:
            return None
        with self._state_lock:
            snapshot = [t.detach().float().clone() for t in self._state_tensors()]
        core = self._state_averager(snapshot)
        with core.get_tensors() as tensors:
            for t, s in zip(tensors, snapshot):
                t.copy_(s)
        result = self._averager_round(core, weight, epoch, expected)
        if result is not None:
            with core.get_tensors() as averaged:
                self._apply_state_delta(snapshot, averaged)
        return result

    def _apply_state_delta(self, snapshot: Sequence[torch.Tensor], averaged: Sequence[torch.Tensor]) -> None:
        """state += averaged - snapshot: what the others brought, keeping local updates made meanwhile."""
        with self._state_lock, torch.no_grad():
            for t, before, after in zip(self._state_tensors(), snapshot, averaged):
                t.add_((after - before).to(t.dtype))
            self._main_to_model()

    def _apply_background_results(self) -> None:
        if self._pending_step is not None and self._pending_step.done():
            self._wait_pending_step()
        if self._pending_state is not None and self._pending_state[0].done():
            future, snapshot = self._pending_state
            self._pending_state = None
            try:
                averaged = future.result()
            except Exception as e:
                logger.debug("%s: background state averaging failed: %r", self.run_id, e)
                averaged = None
            if averaged is not None:
                self._apply_state_delta(snapshot, averaged)

    # ------------------------------------------------------------------ state download


    def _catch_up(self) -> None:
        """Download the swarm's state early in one of its epochs. A state that arrives just before the swarm's
        next transition would leave this peer alone at an epoch the others have finished averaging (it would
        wait out a matchmaking window for nobody, fall behind and download again): so while the swarm is past
        half its target and still training toward it, wait (until its expected transition, bounded) for its
        next epoch to begin."""
        deadline = time.monotonic() + min(30.0, self.load_state_timeout)
        epoch = self.global_epoch
        while time.monotonic() < deadline and self.global_epoch == epoch:
            progress = self.tracker.global_progress
            done = self.tracker.estimated_samples(epoch=epoch)
            training = any(r.epoch == epoch and r.sps > 0 and not r.averaging and progress.time - r.time < 2.0
                           for r in progress.peers.values())
            if not training or not 0.5 * self.target_batch_size < done < self.target_batch_size:
                break  # early in the epoch, or nobody is moving toward its end: download now
            time.sleep(0.05)
            self._run(self.tracker.refresh)
        self.load_state_from_peers()

    def _state_for_donation(self) -> tuple[int, dict[str, Any], list[tuple[str, torch.Tensor]]]:
        """``(epoch, meta, named tensors)`` copied under the state lock (runs on an executor thread)."""
        with self._state_lock:
            epoch = self.local_epoch
            named = [(f"param.{i}", p.detach().cpu().clone()) for i, p in enumerate(self.main_params)]
            named += [(f"extra.{i}", t.detach().cpu().clone()) for i, t in enumerate(self.extra_tensors)]
            opt_tensors: list[torch.Tensor] = []
            opt_skeleton = to_skeleton(self.opt.state_dict(), opt_tensors)
            sched_skeleton = to_skeleton(self.scheduler.state_dict(), opt_tensors) if self.scheduler is not None else None
        named += [(f"opt.{j}", t) for j, t in enumerate(opt_tensors)]
        return epoch, {"optimizer": opt_skeleton, "scheduler": sched_skeleton}, named



    def _manifest_check(self) -> Any:
        return manifest_check([p.detach() for p in self.main_params], self.extra_tensors)

    def _install_state(self, epoch: int, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        params = check_params(tensors, [p.detach() for p in self.main_params], "param")
        extra = check_params(tensors, self.extra_tensors, "extra")
        opt_tensors: list[torch.Tensor] = []
        j = 0
        while f"opt.{j}" in tensors:
            opt_tensors.append(tensors[f"opt.{j}"])
            j += 1
        opt_state = check_optimizer_state(from_skeleton(meta.get("optimizer"), opt_tensors), self.opt)
        sched_state = from_skeleton(meta.get("scheduler"), opt_tensors) if meta.get("scheduler") is not None else None
        with self._state_lock, torch.no_grad():
            for p, value in zip(self.main_params, params):
                p.copy_(value)
            for t, value in zip(self.extra_tensors, extra):
                t.copy_(value)
            self.opt.load_state_dict(opt_state)
            if self.scheduler is not None and sched_state is not None:
                self.scheduler.load_state_dict(sched_state)
            if self.offload_optimizer:
                self._main_to_model()
        self._reset_accumulators()
        self.local_epoch = int(epoch)
        self.tracker.report_local_progress(self.local_epoch, 0)
        self.state_server.epoch_changed()

    # ------------------------------------------------------------------ checkpoints and lifecycle

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's ``state_dict`` with ``state["local_epoch"]`` (hivemind's layout)."""
        with self._state_lock:
            state = self.opt.state_dict()
        state["state"]["local_epoch"] = self.local_epoch
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        state_dict["state"] = dict(state_dict["state"])
        epoch = state_dict["state"].pop("local_epoch", None)
        with self._state_lock:
            self.opt.load_state_dict(state_dict)
        if epoch is not None:
            self.local_epoch = int(epoch)
            self.tracker.report_local_progress(self.local_epoch, self.local_samples)

    def _background_work(self) -> list[concurrent.futures.Future]:
        return [f for f in (self._pending_step, self._pending_state[0] if self._pending_state else None) if f is not None]

    def _averager_cores(self) -> list[AveragerCore]:
        return [self.grad_averager] + ([self._state_core] if self._state_core is not None else [])

    def __repr__(self) -> str:
        return f"Optimizer(run_id={self.run_id!r}, epoch={self.local_epoch}, inner={type(self.opt).__name__})"
