"""The ``monitor`` role: watch a collaborative training run from the DHT, log its epochs, keep checkpoints.

Topology use::

    roles:
      monitor: {run_id: digits, interval: 2.0, checkpoint_dir: null, checkpoint_every: null}

The monitor trains nothing and needs no GPU. Every ``interval`` seconds it reads the swarm's progress
records (``{run_id}_progress``, see :mod:`hivesim.optim.progress`) and the trainers' metrics records
(``{run_id}_metrics``, see :class:`~hivesim.roles.trainer.TrainerMetricsRecord`; only owned, well-formed
records count), records a ``swarm_progress`` sample, and when the swarm's epoch moves on it logs one line::

    epoch 12  peers 8  samples/s 3,210  loss 0.412

(``on_line`` receives it: the log by default, stdout under ``hivesim monitor``) and records a
``monitor_epoch`` sample. With ``checkpoint_dir`` and ``checkpoint_every`` it downloads the training state
from the trainers (:func:`hivesim.optim.download_state`) every ``checkpoint_every`` epochs and writes it
with ``torch.save`` to ``<checkpoint_dir>/<run_id>-epoch<N>.pt``: ``{"run_id", "epoch", "time", "tensors"
(param.<i>, opt.<j>...), "meta"}``, plus ``"model"`` (a ``state_dict``) when ``model`` names the run's model
module.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hivesim.dht.storage import get_dht_time
from hivesim.roles import Role

logger = logging.getLogger(__name__)


def format_line(epoch: int, peers: int, sps: float, loss: float | None) -> str:
    """``epoch 12  peers 8  samples/s 3,210  loss 0.412`` (``loss -`` when no trainer published one)."""
    return f"epoch {epoch}  peers {peers}  samples/s {sps:,.0f}  loss {'-' if loss is None else f'{loss:.3f}'}"


class MonitorRole(Role):
    name = "monitor"

    def __init__(self, peer: Any, run_id: str = "digits", target_batch_size: int = 1, interval: float = 2.0,
                 checkpoint_dir: str | None = None, checkpoint_every: int | None = None,
                 download_timeout: float = 30.0, model: str | None = None, model_seed: int = 0) -> None:
        super().__init__(peer)
        if not isinstance(run_id, str) or not run_id or "." in run_id:
            raise ValueError(f"monitor: run_id must be a non-empty name without dots, got {run_id!r}")
        if not isinstance(target_batch_size, int) or target_batch_size <= 0:
            raise ValueError(f"monitor: target_batch_size must be a positive integer, got {target_batch_size!r}")
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise ValueError(f"monitor: interval must be positive, got {interval!r}")
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every <= 0):
            raise ValueError(f"monitor: checkpoint_every must be a positive number of epochs, got {checkpoint_every!r}")
        if (checkpoint_dir is None) != (checkpoint_every is None):
            raise ValueError("monitor: checkpointing needs both checkpoint_dir and checkpoint_every")
        if download_timeout <= 0:
            raise ValueError("monitor: download_timeout must be positive")
        self.run_id = run_id
        self.target_batch_size = target_batch_size
        self.interval = float(interval)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.download_timeout = download_timeout
        self.model_path = model
        self.model_seed = model_seed
        self.on_line: Callable[[str], Any] = lambda line: logger.info("%s: %s", run_id, line)
        self.tracker: Any = None
        self.epoch = -1  # the last epoch logged
        self.peers = 0
        self.samples_per_second = 0.0
        self.loss: float | None = None
        self.lines: list[str] = []
        self.checkpoints: list[Path] = []
        self.checkpoint_failures = 0
        self.reads = 0
        self._last_checkpoint_epoch: int | None = None
        self._checkpointing: asyncio.Task | None = None

    async def start(self) -> None:
        from hivesim.optim.progress import ProgressTracker

        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.checkpoint_dir, os.W_OK):
                raise ValueError(f"monitor: cannot write checkpoints to {self.checkpoint_dir}")
        # never started: it only reads (a started tracker would publish a record of its own)
        self.tracker = ProgressTracker(self.peer.dht, self.run_id, self.target_batch_size, client_mode=True)
        self.peer.spawn(self._loop(), name="monitor.loop")

    async def stop(self) -> None:
        task = self._checkpointing
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=5.0)

    # ------------------------------------------------------------------ reading the swarm

    async def read(self) -> dict[str, Any]:
        """The swarm now: epoch, peers at it, their samples/s and samples, and the trainers' mean losses."""
        from hivesim.dht.validation import owner_of_subkey
        from hivesim.roles.trainer import TrainerMetricsRecord, metrics_key

        progress = await self.tracker.refresh()
        me = self.peer.dht.peer_id
        records = {pid: r for pid, r in progress.peers.items() if pid != me}
        servers = [r.epoch for r in records.values() if not r.client]
        epoch = max(servers) if servers else max((r.epoch for r in records.values()), default=0)
        at_epoch = [r for r in records.values() if r.epoch == epoch]
        out: dict[str, Any] = {
            "epoch": epoch, "peers": len(at_epoch), "peers_total": len(records),
            "samples": sum(r.samples for r in at_epoch),
            "samples_per_second": sum(r.sps for r in at_epoch if not r.aux),
            "loss": None, "test_loss": None, "test_accuracy": None, "trainers": 0,
        }
        try:
            found = await self.peer.dht.get(metrics_key(self.run_id), latest=True)
        except Exception as e:
            logger.debug("monitor: metrics read failed: %r", e)
            found = None
        now = get_dht_time()
        published = []
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                if owner_of_subkey(subkey) is None or getattr(item, "expiration_time", 0.0) <= now:
                    continue
                try:
                    published.append(TrainerMetricsRecord.model_validate(getattr(item, "value", None)))
                except ValidationError:
                    continue
        if published:
            newest = max(r.epoch for r in published)
            recent = [r for r in published if r.epoch >= newest - 1]  # stale records of dead peers do not count
            out["trainers"] = len(recent)
            out["loss"] = sum(r.loss for r in recent) / len(recent)
            tests = [r for r in recent if r.test_loss is not None]
            if tests:
                out["test_loss"] = sum(r.test_loss for r in tests) / len(tests)  # type: ignore[misc]
                accs = [r.test_accuracy for r in tests if r.test_accuracy is not None]
                out["test_accuracy"] = sum(accs) / len(accs) if accs else None
        self.reads += 1
        return out

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bad read is a missed read
                logger.warning("monitor: reading the swarm failed: %r", e)
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def poll(self) -> dict[str, Any]:
        """One read: a sample, a line if the epoch moved on, a checkpoint if one is due."""
        view = await self.read()
        metrics = self.peer.metrics
        loss = view["loss"]
        metrics.sample("swarm_progress", view["epoch"], peers=view["peers"], peers_total=view["peers_total"],
                       samples=view["samples"], samples_per_second=round(view["samples_per_second"], 1),
                       loss=loss, test_loss=view["test_loss"], test_accuracy=view["test_accuracy"],
                       trainers=view["trainers"])
        self.peers, self.samples_per_second, self.loss = view["peers"], view["samples_per_second"], loss
        if view["peers_total"] and view["epoch"] > self.epoch:
            self.epoch = view["epoch"]
            line = format_line(view["epoch"], view["peers"], view["samples_per_second"], loss)
            self.lines.append(line)
            metrics.sample("monitor_epoch", view["epoch"], peers=view["peers"],
                           samples_per_second=round(view["samples_per_second"], 1), loss=loss)
            try:
                self.on_line(line)
            except Exception as e:
                logger.debug("monitor: on_line failed: %r", e)
            self._maybe_checkpoint(view["epoch"])
        return view

    # ------------------------------------------------------------------ checkpoints

    def _maybe_checkpoint(self, epoch: int) -> None:
        if self.checkpoint_dir is None or self.checkpoint_every is None or epoch <= 0:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            return  # the previous download is still running
        last = self._last_checkpoint_epoch
        if epoch < (self.checkpoint_every if last is None else last + self.checkpoint_every):
            return
        self._checkpointing = self.peer.spawn(self.checkpoint(), name="monitor.checkpoint")

    async def checkpoint(self) -> Path | None:
        """Download the trainers' state now and save it; None (counted, logged) if no donor gave it."""
        from hivesim.averaging.state_sharing import StateUnavailable, download_state

        assert self.checkpoint_dir is not None
        node = self.peer.dht
        t0 = time.monotonic()
        try:
            state = await download_state(self.peer.endpoint, node, self.run_id, timeout=self.download_timeout,
                                         exclude=node.peer_id)
        except (StateUnavailable, asyncio.TimeoutError, OSError) as e:
            self.checkpoint_failures += 1
            self.peer.metrics.sample("checkpoint", math.nan, ok=False, error=str(e)[:200])
            logger.warning("monitor: checkpoint failed: %s", e)
            return None
        path = self.checkpoint_dir / f"{self.run_id}-epoch{state.epoch:06d}.pt"
        await asyncio.get_running_loop().run_in_executor(None, self._save, path, state)
        self._last_checkpoint_epoch = state.epoch
        self.checkpoints.append(path)
        self.peer.metrics.sample("checkpoint", state.epoch, ok=True, path=str(path), donors=len(state.donors),
                                 failed_donors=state.failed_donors, seconds=round(time.monotonic() - t0, 3))
        return path

    def _save(self, path: Path, state: Any) -> None:
        import torch

        payload: dict[str, Any] = {"run_id": self.run_id, "epoch": state.epoch, "time": time.time(),
                                   "tensors": state.tensors, "meta": state.meta}
        if self.model_path is not None:
            from hivesim.roles.trainer import load_model_module

            model = load_model_module(self.model_path).make_model(self.model_seed)
            names = [name for name, _ in model.named_parameters()]
            if all(f"param.{i}" in state.tensors for i in range(len(names))):
                payload["model"] = {name: state.tensors[f"param.{i}"] for i, name in enumerate(names)}
        tmp = path.with_suffix(".pt.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a reader never sees half a checkpoint

    def status(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "peers": self.peers, "checkpoints": len(self.checkpoints)}


ROLE = MonitorRole
