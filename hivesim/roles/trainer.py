"""The ``trainer`` role: a peer that trains a model together with the swarm through :class:`hivesim.Optimizer`.

Topology use::

    roles:
      trainer: {model: experiments.train_digits, run_id: digits, target_batch_size: 1024, batch_size: 32,
                lr: 0.003, optimizer_opts: {averaging_timeout: 10}, max_epochs: null, duration: null}

``model`` names a module (see ``experiments/train_digits.py``) with ``make_model(seed)``,
``batches(shard, batch_size, seed, num_shards)``, ``loss(model, batch)`` and ``evaluate(model)``; every peer
builds the model from ``model_seed``, so the swarm starts from one set of parameters, and trains on its own
shard of the data (``shard``, or one derived from the peer's name). ``optimizer_opts`` go to
:class:`hivesim.Optimizer` as they are (``matchmaking_time``, ``averaging_timeout``, ``use_local_updates``...).

The training loop runs in a thread of its own (the optimizer's methods block; the peer's event loop must
keep serving its DHT node and averagers). It stops when the role stops (the thread notices a flag at its
next step, is joined with a timeout, and shuts the optimizer down), after ``max_epochs`` or ``duration``
seconds, and when the peer is killed abruptly: the peer cancels its tasks, one of which is a watcher that
raises the same flag, and the thread also checks the peer's state at every step.

Samples recorded into ``peer.metrics`` (from the event loop, so draining never races the thread):

* ``train_loss`` every ``log_every`` seconds: mean loss of the steps since, ``epoch``, ``steps``,
  ``samples_per_second`` (this peer's), ``global_samples_per_second`` (the swarm's, as the tracker sees it);
* ``epoch`` at every change of the local epoch (value: the new epoch): ``averaged``, ``group_size``,
  ``expected_peers``, ``samples`` (this peer's in the finished epoch), ``seconds`` (the transition),
  ``bytes_sent`` / ``bytes_received`` (the endpoint's traffic since the previous change), ``downloaded``
  (the epoch came from a state download), ``state_downloads``, ``averaging_failures``;
* ``round`` for every averaging round the optimizer finished (value: the epoch it belongs to): ``averaged``,
  ``group_size``, ``expected_peers``, ``samples``, ``seconds``. Background rounds (streaming DiLoCo's fragments,
  delayed updates) finish after their epoch's transition, so this, not ``epoch``, is the per-round record;
* ``eval`` at every change of the epoch (value: held-out loss): ``accuracy``, ``epoch``;
* ``trainer_done`` once (value: the final epoch): why it stopped, ``state_downloads``, ``averaging_failures``.

Each trainer also publishes its last loss under ``{run_id}_metrics`` in a subkey it owns
(``owner_marker(public key)``: nobody can write in its name); the value is a :class:`TrainerMetricsRecord`,
which readers (the ``monitor`` role) check with pydantic.

``method`` chooses how the peers train together:

* ``gradient_averaging`` (default): :class:`hivesim.Optimizer`, gradients accumulated until the swarm reaches
  ``target_batch_size``, averaged, one step together;
* ``local_updates``: :class:`hivesim.Optimizer` with ``use_local_updates=True`` (a step on every local batch,
  parameters averaged every epoch);
* ``diloco``: :class:`hivesim.DiLoCoOptimizer`: ``num_inner_steps`` local steps of the inner optimizer, then the
  peers average their pseudo-gradients and take an outer step (SGD, ``outer_lr``, ``outer_momentum``, Nesterov
  when the momentum is not 0); an epoch is an outer step;
* ``diloco_streaming``: the same with ``num_fragments`` (default 4) fragments synced on a staggered schedule;
* ``alone``: no collaboration at all (a plain torch optimizer; an "epoch" every ``target_batch_size`` samples),
  the single-peer baseline.

``aggregation`` (``mean``, ``centered_clip``, ``trimmed_mean``, ``median``) is how this peer reduces its parts of
an averaging round (:mod:`hivesim.averaging.robust`). ``attack`` makes this trainer Byzantine
(:mod:`hivesim.roles.attacks`: ``sign_flip``, ``label_flip``, ``random_direction``, ``alie``; options in
``attack_opts``): it runs the honest protocol but corrupts the gradients it contributes.

``max_samples`` stops a peer after that many of its own samples; ``eval_every_samples`` evaluates at an epoch
change only once that many samples went by since the last evaluation; ``compression`` (``"float16"``...) goes to
whatever the method averages (``grad_compression`` and ``state_averaging_compression``, or DiLoCo's ``compression``). Every ``epoch`` and ``eval`` sample also carries the running totals of this peer:
``samples_total``, ``bytes_sent_total`` (its endpoint's, DHT included), ``compute_s`` (forward + backward +
``step_delay``), ``wall_s`` (since its training started) and the ``method``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hivesim.dht.storage import get_dht_time
from hivesim.dht.validation import owner_marker
from hivesim.roles import Role

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
METHODS = ("gradient_averaging", "local_updates", "diloco", "diloco_streaming", "alone")


class LocalOptimizer:
    """The ``alone`` method: a plain torch optimizer with the few attributes the trainer reads; its epoch
    advances every ``target_batch_size`` samples, with nobody to average with."""

    def __init__(self, optimizer: Any, target_batch_size: int, batch_size: int) -> None:
        self.optimizer = optimizer
        self.steps_per_epoch = max(1, target_batch_size // batch_size)
        self.steps = 0
        self.local_epoch = 0
        self.state_downloads = 0
        self.averaging_failures = 0
        self.last_epoch_report = None

    def step(self) -> None:
        self.optimizer.step()
        self.steps += 1
        self.local_epoch = self.steps // self.steps_per_epoch

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def shutdown(self) -> None:
        pass


class TrainerMetricsRecord(BaseModel):
    """What a trainer publishes about its training under ``{run_id}_metrics`` (checked by every reader)."""

    model_config = ConfigDict(extra="forbid")
    epoch: int = Field(ge=0, le=1 << 40)
    loss: float = Field(ge=0.0, le=1e9, allow_inf_nan=False)  # mean training loss of the last steps
    test_loss: float | None = Field(default=None, ge=0.0, le=1e9, allow_inf_nan=False)
    test_accuracy: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    sps: float = Field(ge=0.0, le=1e9, allow_inf_nan=False)
    time: float = Field(allow_inf_nan=False)


def metrics_key(run_id: str) -> str:
    return f"{run_id}_metrics"


def load_model_module(path: str) -> Any:
    """The model module named by ``path``, checked for the functions a trainer calls."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"trainer: model must be a module path such as 'experiments.train_digits', got {path!r}")
    module = importlib.import_module(path)
    missing = [f for f in ("make_model", "batches", "loss", "evaluate") if not callable(getattr(module, f, None))]
    if missing:
        raise ValueError(f"trainer: model module {path} lacks {', '.join(missing)}")
    return module


def start_daemon_thread(fn: Callable[[], Any], name: str) -> concurrent.futures.Future:
    """Run ``fn`` in a daemon thread (one stuck in a blocking call never holds the process up at exit)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class TrainerRole(Role):
    name = "trainer"

    def __init__(self, peer: Any, model: str = "experiments.train_digits", run_id: str = "digits",
                 target_batch_size: int = 1024, batch_size: int = 32, lr: float = 1e-3, optimizer: str = "adam",
                 optimizer_opts: dict[str, Any] | None = None, max_epochs: int | None = None,
                 duration: float | None = None, model_seed: int = 0, shard: int | None = None, num_shards: int = 4,
                 data_seed: int | None = None, step_delay: float = 0.0, log_every: float = 0.5,
                 evaluate: bool = True, publish_every: float = 2.0, metrics_ttl: float = 30.0,
                 stop_timeout: float = 4.0, method: str = "gradient_averaging", num_inner_steps: int = 50,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, num_fragments: int | None = None,
                 max_samples: int | None = None, eval_every_samples: int = 0, compression: str | None = None,
                 threads: int | None = None, aggregation: str = "mean", attack: str | None = None,
                 attack_opts: dict[str, Any] | None = None) -> None:
        super().__init__(peer)
        if not isinstance(run_id, str) or not run_id or "." in run_id:
            raise ValueError(f"trainer: run_id must be a non-empty name without dots, got {run_id!r}")
        for label, value in (("target_batch_size", target_batch_size), ("batch_size", batch_size), ("num_shards", num_shards)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"trainer: {label} must be a positive integer, got {value!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"trainer: lr must be positive, got {lr!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"trainer: optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if max_epochs is not None and max_epochs <= 0 or duration is not None and duration <= 0:
            raise ValueError("trainer: max_epochs and duration must be positive (or null: no limit)")
        if step_delay < 0 or log_every <= 0 or stop_timeout <= 0:
            raise ValueError("trainer: step_delay must be >= 0; log_every and stop_timeout positive")
        if shard is not None and not 0 <= shard < num_shards:
            raise ValueError(f"trainer: shard must be in [0, {num_shards}), got {shard}")
        if method not in METHODS:
            raise ValueError(f"trainer: method must be one of {', '.join(METHODS)}, got {method!r}")
        if not isinstance(num_inner_steps, int) or isinstance(num_inner_steps, bool) or num_inner_steps <= 0:
            raise ValueError(f"trainer: num_inner_steps must be a positive integer, got {num_inner_steps!r}")
        if not (isinstance(outer_lr, (int, float)) and outer_lr > 0) or not 0 <= outer_momentum < 1:
            raise ValueError("trainer: outer_lr must be positive and outer_momentum in [0, 1)")
        if num_fragments is not None and (not isinstance(num_fragments, int) or num_fragments < 1):
            raise ValueError(f"trainer: num_fragments must be a positive integer, got {num_fragments!r}")
        if max_samples is not None and max_samples <= 0 or eval_every_samples < 0:
            raise ValueError("trainer: max_samples must be positive (or null) and eval_every_samples >= 0")
        if threads is not None and threads < 1:
            raise ValueError(f"trainer: threads must be positive, got {threads!r}")
        from hivesim.averaging.robust import Aggregation
        from hivesim.roles.attacks import make_attack

        Aggregation.of(aggregation)  # a bad name fails here, with the choices
        if aggregation != "mean" and method not in ("gradient_averaging", "local_updates"):
            raise ValueError(f"trainer: aggregation {aggregation!r} needs method gradient_averaging or local_updates")
        self.aggregation = aggregation
        self.attack = make_attack(attack, **dict(attack_opts or {}))
        self.attack_name = attack
        self.module = load_model_module(model)
        self.model_path = model
        self.run_id = run_id
        self.target_batch_size = target_batch_size
        self.batch_size = batch_size
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.optimizer_opts = dict(optimizer_opts or {})
        self.optimizer_opts.setdefault("averaging_timeout", 10.0)  # a stuck round never holds a step forever
        for reserved in ("dht", "run_id", "target_batch_size", "batch_size_per_step", "optimizer", "params"):
            if reserved in self.optimizer_opts:
                raise ValueError(f"trainer: optimizer_opts may not set {reserved!r} (the role sets it)")
        self.max_epochs = max_epochs
        self.duration = duration
        self.model_seed = model_seed
        shard_of = getattr(self.module, "shard_of", None)
        self.shard = shard if shard is not None else (shard_of(peer.name, num_shards) if shard_of else 0)
        self.num_shards = num_shards
        self.data_seed = data_seed
        self.step_delay = step_delay
        self.log_every = log_every
        self.evaluate = evaluate
        self.publish_every = publish_every
        self.metrics_ttl = metrics_ttl
        self.stop_timeout = stop_timeout
        self.method = method
        self.num_inner_steps = num_inner_steps
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.num_fragments = num_fragments if num_fragments is not None else (4 if method == "diloco_streaming" else 1)
        self.max_samples = max_samples
        self.eval_every_samples = eval_every_samples
        self.compression = compression
        self.threads = threads
        self.compute_s = 0.0
        self.bytes_sent_at_start = 0
        self.train_started = time.monotonic()
        self._samples_at_eval = 0

        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: concurrent.futures.Future | None = None
        self.optimizer: Any = None  # the hivesim.Optimizer, once the thread made it
        self.model: Any = None
        self.epoch = 0
        self.steps = 0
        self.samples = 0
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] | None = None
        self.stopped_because: str | None = None
        self.error: str | None = None
        self._last_publish = 0.0

    # ------------------------------------------------------------------ lifecycle (event loop)

    async def start(self) -> None:
        from hivesim.dht.facade import DHT

        self._loop = asyncio.get_running_loop()
        self.dht_view = DHT.attach(self.peer.dht, self._loop)
        self._done = start_daemon_thread(self._train, name=f"trainer-{self.peer.name}")
        self.peer.spawn(self._watch(), name="trainer.watch")

    async def _watch(self) -> None:
        """Lives as long as the training thread; the peer cancels it on a kill, which stops the thread."""
        assert self._done is not None
        try:
            await asyncio.wrap_future(self._done)
        except asyncio.CancelledError:
            self._stop.set()
            raise
        except Exception as e:
            logger.error("peer %s: the training thread failed: %r", self.peer.name, e)

    async def stop(self) -> None:
        """Raise the flag, give the thread ``stop_timeout`` s to finish its step and shut the optimizer down."""
        self._stop.set()
        if self._done is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._done)), self.stop_timeout)
        except asyncio.TimeoutError:
            logger.warning("peer %s: the training thread did not stop within %.1f s; shutting its optimizer down",
                           self.peer.name, self.stop_timeout)
            if self.optimizer is not None:
                await asyncio.wrap_future(start_daemon_thread(self.optimizer.shutdown, "trainer-shutdown"))
        except Exception:
            pass  # the thread's own error was logged by the watcher

    def _should_stop(self) -> bool:
        return self._stop.is_set() or self.peer.state in ("killed", "stopped")

    def _emit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Run ``fn`` in the event loop (metrics are only touched there); False once the loop is gone."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(partial(fn, *args, **kwargs))
            return True
        except RuntimeError:
            return False

    def _sample(self, name: str, value: float, **fields: Any) -> None:
        if not self._emit(self.peer.metrics.sample, name, value, **fields):
            self._stop.set()

    # ------------------------------------------------------------------ the training thread

    def _make_optimizer(self, model: Any) -> Any:
        import torch

        from hivesim.optim import Optimizer

        factory = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.optimizer_name]
        opts = dict(self.optimizer_opts)
        if self.method == "alone":
            return LocalOptimizer(factory(model.parameters(), lr=self.lr), self.target_batch_size, self.batch_size)
        if self.method in ("diloco", "diloco_streaming"):
            import hivesim

            if self.compression is not None:
                opts["compression"] = self.compression
            outer = partial(torch.optim.SGD, lr=self.outer_lr, momentum=self.outer_momentum,
                            nesterov=self.outer_momentum > 0)
            return hivesim.DiLoCoOptimizer(dht=self.dht_view, run_id=self.run_id, params=model.parameters(),
                                           inner_optimizer=partial(factory, lr=self.lr), outer_optimizer=outer,
                                           num_inner_steps=self.num_inner_steps, batch_size_per_step=self.batch_size,
                                           num_fragments=self.num_fragments, **opts)
        if self.method == "local_updates":
            opts["use_local_updates"] = True
        if self.compression is not None:
            opts.setdefault("grad_compression", self.compression)
            opts.setdefault("state_averaging_compression", self.compression)
        if self.aggregation != "mean":
            opts.setdefault("aggregation", self.aggregation)
        return Optimizer(dht=self.dht_view, run_id=self.run_id, target_batch_size=self.target_batch_size,
                         batch_size_per_step=self.batch_size, optimizer=partial(factory, lr=self.lr),
                         params=model.parameters(), **opts)

    def _train(self) -> None:
        try:
            self._train_loop()
        except BaseException as e:
            if not self._should_stop():  # a failure while the peer dies is the death, not a bug
                self.error = repr(e)
                self._emit(self.peer.metrics.event, "trainer_failed", error=repr(e)[:300])
                self._sample("trainer_done", self.epoch, reason=f"failed: {e!r}"[:300], steps=self.steps)
                raise
            self.stopped_because = self.stopped_because or "peer stopped"
        finally:
            if self.optimizer is not None:
                try:
                    self.optimizer.shutdown()
                except Exception as e:
                    logger.debug("peer %s: optimizer shutdown failed: %r", self.peer.name, e)

    def _train_loop(self) -> None:
        import torch

        module = self.module
        if self.threads:
            torch.set_num_threads(self.threads)
        model = self.model = module.make_model(self.model_seed)
        opt = self.optimizer = self._make_optimizer(model)
        data = module.batches(self.shard, self.batch_size, self.data_seed if self.data_seed is not None else self.shard,
                              num_shards=self.num_shards)
        slowdown = float(getattr(self.peer, "slowdown", 1.0) or 1.0)
        endpoint_stats = self.peer.endpoint.stats
        bytes_at = (endpoint_stats["bytes_sent"], endpoint_stats["bytes_received"])
        seen_reports: set[int] = set()
        self.bytes_sent_at_start = endpoint_stats["bytes_sent"]
        started = self.train_started = time.monotonic()
        self.epoch = opt.local_epoch
        window_losses: list[float] = []
        window_started, window_samples = time.monotonic(), 0
        self._evaluate_and_record(model, self.epoch)
        while True:
            if self._should_stop():
                self.stopped_because = "stopped"
                break
            if self.max_epochs is not None and opt.local_epoch >= self.max_epochs:
                self.stopped_because = "max_epochs"
                break
            if self.duration is not None and time.monotonic() - started >= self.duration:
                self.stopped_because = "duration"
                break
            if self.max_samples is not None and self.samples >= self.max_samples:
                self.stopped_because = "max_samples"
                break
            batch = next(data)
            compute_started = time.perf_counter()
            if self.attack is not None:
                batch = self.attack.batch(batch)
            loss = module.loss(model, batch)
            loss.backward()
            if self.attack is not None:
                self.attack.gradients(model.parameters())
            if self.step_delay:
                time.sleep(self.step_delay * slowdown)  # stands for a bigger model's compute
            self.compute_s += time.perf_counter() - compute_started
            if self._should_stop():
                self.stopped_because = "stopped"
                break
            epoch_before, downloads_before = opt.local_epoch, opt.state_downloads
            report_before = opt.last_epoch_report
            opt.step()
            opt.zero_grad()
            seen_reports = self._record_rounds(opt, seen_reports)
            value = float(loss.detach())
            if not torch.isfinite(torch.tensor(value)):
                raise FloatingPointError(f"the training loss is {value}")
            self.steps += 1
            self.samples += self.batch_size
            self.last_loss = value
            window_losses.append(value)
            window_samples += self.batch_size

            now = time.monotonic()
            if now - window_started >= self.log_every:
                sps = window_samples / max(now - window_started, 1e-6)
                progress = getattr(opt, "global_progress", None)
                self._sample("train_loss", sum(window_losses) / len(window_losses), epoch=opt.local_epoch,
                             steps=len(window_losses), samples_per_second=round(sps, 1),
                             global_samples_per_second=round(getattr(progress, "samples_per_second", 0.0), 1),
                             peers=getattr(progress, "num_peers", 1), **self._totals())
                window_losses, window_started, window_samples = [], now, 0

            if opt.local_epoch != epoch_before:
                sent, received = endpoint_stats["bytes_sent"], endpoint_stats["bytes_received"]
                report = opt.last_epoch_report
                downloaded = opt.state_downloads > downloads_before
                fresh = report is not None and report is not report_before
                self.epoch = opt.local_epoch
                self._sample("epoch", opt.local_epoch, previous=epoch_before, downloaded=downloaded,
                             averaged=bool(fresh and report.averaged), group_size=report.group_size if fresh else 0,
                             expected_peers=report.expected_peers if fresh else 0,
                             samples=report.samples if fresh else 0,
                             seconds=round(report.seconds, 4) if fresh else 0.0,
                             bytes_sent=sent - bytes_at[0], bytes_received=received - bytes_at[1],
                             state_downloads=opt.state_downloads,
                             averaging_failures=getattr(opt, "averaging_failures", 0), **self._totals())
                bytes_at = (sent, received)
                if self.samples - self._samples_at_eval >= self.eval_every_samples:
                    self._evaluate_and_record(model, opt.local_epoch)
            self._maybe_publish(opt)
        if self.evaluate and self._samples_at_eval != self.samples:  # where it ended, for the study's final loss
            self._evaluate_and_record(model, opt.local_epoch)
        self._sample("trainer_done", opt.local_epoch, reason=self.stopped_because, steps=self.steps,
                     state_downloads=opt.state_downloads, averaging_failures=getattr(opt, "averaging_failures", 0),
                     **self._totals())

    def _record_rounds(self, opt: Any, seen: set[int]) -> set[int]:
        """A ``round`` sample for each averaging report that appeared since the last call (by identity: a
        background round's report lands whenever that round ends)."""
        reports = list(getattr(opt, "epoch_reports", ()))
        for report in reports:
            if id(report) not in seen:
                self._sample("round", report.epoch, averaged=bool(report.averaged), group_size=report.group_size,
                             expected_peers=report.expected_peers, samples=report.samples,
                             seconds=round(report.seconds, 4))
        return {id(r) for r in reports}

    def _totals(self) -> dict[str, Any]:
        """This peer's running totals, recorded with every epoch and evaluation."""
        return {"samples_total": self.samples,
                "bytes_sent_total": self.peer.endpoint.stats["bytes_sent"] - self.bytes_sent_at_start,
                "compute_s": round(self.compute_s, 4), "wall_s": round(time.monotonic() - self.train_started, 4),
                "method": self.method}

    def _evaluate_and_record(self, model: Any, epoch: int) -> None:
        if not self.evaluate:
            return
        result = self.module.evaluate(model)
        self.last_eval = result
        self._samples_at_eval = self.samples
        self._sample("eval", result["loss"], accuracy=result.get("accuracy"), epoch=epoch, **self._totals())
        self._last_publish = 0.0  # publish the new figures soon

    def _maybe_publish(self, opt: Any) -> None:
        now = time.monotonic()
        if self.publish_every <= 0 or now - self._last_publish < self.publish_every or self.last_loss is None:
            return
        self._last_publish = now
        record = TrainerMetricsRecord(epoch=opt.local_epoch, loss=min(max(self.last_loss, 0.0), 1e9),
                                      test_loss=None if self.last_eval is None else self.last_eval["loss"],
                                      test_accuracy=None if self.last_eval is None else self.last_eval.get("accuracy"),
                                      sps=min(max(float(getattr(getattr(opt, "local_progress", None),
                                                                        "samples_per_second", 0.0)), 0.0), 1e9),
                                      time=get_dht_time())
        node = self.peer.dht
        self._emit(self._publish, node, record)

    def _publish(self, node: Any, record: TrainerMetricsRecord) -> None:
        """(event loop) store the record in the background; a failed store is retried at the next publish."""
        if self.peer.state not in ("running", "starting"):
            return

        async def store() -> None:
            try:
                await node.store(metrics_key(self.run_id), record.model_dump(), get_dht_time() + self.metrics_ttl,
                                 subkey=owner_marker(node.public_key))
            except Exception as e:
                logger.debug("peer %s: metrics store failed: %r", self.peer.name, e)

        self.peer.spawn(store(), name="trainer.publish")

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": self.epoch, "steps": self.steps}
        if self.last_loss is not None:
            out["loss"] = round(self.last_loss, 4)
        return out


ROLE = TrainerRole
