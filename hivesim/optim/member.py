"""What every collaborative optimizer of a swarm shares: the network side and its bookkeeping.

:class:`SwarmMember` is the base of :class:`~hivesim.optim.Optimizer` and
:class:`~hivesim.optim.DiLoCoOptimizer`: it owns the call into the DHT's event loop, the progress tracker
and the state server, averaging rounds among the peers at one epoch, the per-epoch reports, and state
download for peers that fell behind (with a growing pause after failures). Subclasses say what their state
is (:meth:`SwarmMember._state_for_donation` / :meth:`SwarmMember._install_state`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hivesim.averaging.averager import AveragerCore, StepResult
from hivesim.optim.progress import GlobalProgress, LocalProgress, ProgressTracker
from hivesim.averaging.state_sharing import StateServer, StateUnavailable, download_state
from hivesim.optim.training_state import StateMismatch

logger = logging.getLogger("hivesim.optim")

CONFIRM_READ_AGE = 0.05  # seconds: a view of the swarm older than this is re-read before an epoch ends (once an epoch)


@dataclass
class EpochReport:
    """What happened at one epoch transition (``last_epoch_report``)."""

    epoch: int  # the epoch that ended
    samples: int  # this peer's samples in it
    expected_peers: int  # peers the tracker saw at this epoch
    group_size: int  # peers in the averaging group (0: no averaging)
    averaged: bool  # gradients (or parameters) were averaged with others
    seconds: float  # time spent in the transition (averaging + step), as seen by the training thread


class SwarmMember:
    """Shared machinery; subclasses call :meth:`_init_member` in their ``__init__``."""

    dht: Any
    run_id: str
    shutdown_timeout: float
    _background: concurrent.futures.ThreadPoolExecutor
    _closed: bool
    tracker: ProgressTracker
    state_server: StateServer
    local_epoch: int

    def _init_member(self, dht: Any, run_id: str, *, load_state_timeout: float, averaging_timeout: float | None,
                     auxiliary: bool, verbose: bool) -> None:
        if not isinstance(run_id, str) or not run_id or "." in run_id:
            raise ValueError(f"run_id must be a non-empty name without dots, got {run_id!r}")
        self.dht = dht
        self.run_id = run_id
        self.load_state_timeout = load_state_timeout
        self.averaging_timeout = averaging_timeout
        self.auxiliary = auxiliary
        self.verbose = verbose
        self.local_epoch = 0
        self.averaging_failures = 0
        self.epochs_averaged = 0
        self.state_downloads = 0
        self.failed_downloads = 0
        self.last_download: dict[str, Any] | None = None  # epoch, donors, failed_donors of the last state download
        self.last_epoch_report: EpochReport | None = None
        self.epoch_reports: list[EpochReport] = []  # the last few transitions, newest last
        self._checked_newcomer = False
        self._next_load_attempt = 0.0
        self._warned_alone = False

    @property
    def local_progress(self) -> LocalProgress:
        return self.tracker.local

    @property
    def global_progress(self) -> GlobalProgress:
        return self.tracker.global_progress

    @property
    def global_epoch(self) -> int:
        return self.tracker.global_epoch

    @property
    def last_averaging_ok(self) -> bool | None:
        """Whether the last epoch transition averaged with others (None before the first)."""
        return None if self.last_epoch_report is None else self.last_epoch_report.averaged

    def _run(self, make_coro: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``await make_coro()`` in the DHT's event loop and wait for it."""
        return self.dht.run_coroutine(lambda _dht, _node: make_coro(), return_future=True).result(timeout)

    def _log(self, message: str, *args: Any) -> None:
        logger.log(logging.INFO if self.verbose else logging.DEBUG, "%s: " + message, self.run_id, *args)

    def _record(self, epoch: int, samples: int, expected: int, group_size: int, started: float) -> None:
        averaged = group_size >= 2
        if expected >= 2 and not averaged:
            self.averaging_failures += 1
            if not self._warned_alone:
                logger.warning("%s: epoch %d: averaging with %d other peers failed; stepping with local gradients "
                               "(counted in averaging_failures; logged once)", self.run_id, epoch, expected - 1)
                self._warned_alone = True
        self.epochs_averaged += averaged
        report = EpochReport(epoch, samples, expected, group_size, averaged, time.monotonic() - started)
        self.last_epoch_report = report
        self.epoch_reports = (self.epoch_reports + [report])[-64:]
        self._log("epoch %d done: %d samples here, averaged with %d of %d peers in %.3f s", epoch, samples,
                  group_size, expected, report.seconds)

    def _averager_round(self, core: AveragerCore, weight: float, epoch: int, expected: int) -> StepResult | None:
        """One averaging round of ``core`` among the peers at ``epoch`` (blocking; None if no group)."""
        core.keys.prefix = f"{core.prefix}_e{epoch}"  # only peers at the same epoch meet
        core.matchmaker.target_group_size = max(2, expected)
        core.matchmaker.end_when_alone = False  # the tracker saw others at this round: wait the window for them
        timeout = self.averaging_timeout
        try:
            return self._run(lambda: core.step(weight=weight, timeout=timeout, gather=epoch),
                             None if timeout is None else timeout + 10.0)
        except Exception as e:  # a failed round is a round without a group: the caller goes on alone
            logger.debug("%s: averaging at epoch %d failed: %r", self.run_id, epoch, e)
            return None

    def _should_load_state(self) -> bool:
        if self.auxiliary:
            return False
        if time.monotonic() < self._next_load_attempt:
            return False  # the last download failed: train on meanwhile, try again later
        first, self._checked_newcomer = not self._checked_newcomer, True
        if first and self.global_epoch > self.local_epoch:
            return True  # a newcomer to a swarm that has moved on: start from its state, not from scratch
        return self.local_epoch < self.global_epoch - 1

    def _plan_round(self, epoch: int, background: bool) -> tuple[int, bool]:
        """``(expected peers, skip)`` for this peer's averaging round at ``epoch``, announced to the swarm first.

        ``skip``: the others finished this epoch already, nobody to meet. A peer whose rounds run in the
        background announces the next epoch as soon as it launches one, so with ``background`` the peers one
        epoch ahead may still be in this round: they count, and only two epochs ahead means over.
        """
        ahead = 1 if background else 0
        if self.global_epoch <= epoch + ahead:
            self._run(self.tracker.announce_transition)
        if self.tracker.staleness > CONFIRM_READ_AGE:
            self._run(self.tracker.refresh)  # who else is at this round now, not at the last scheduled read
        expected = self.tracker.peers_around(epoch) + (self.tracker.peers_at(epoch + 1) - 1 if ahead else 0)
        if logger.isEnabledFor(logging.DEBUG):
            self._log("round %d ends here: expecting %d peers (view %.2f s old: %s)", epoch, expected,
                      self.tracker.staleness,
                      sorted((r.epoch, r.samples, r.averaging) for r in self.tracker.global_progress.peers.values()))
        # (with rounds in the background peers enter epochs a round apart: an early announcement proves nothing)
        late = not background and self.tracker.started_without_me(epoch)
        return expected, self.global_epoch > epoch + ahead or expected < 2 or late

    def _wait_pending_step(self) -> None:
        """Finish background work that changes the state (a subclass's delayed step) before replacing it."""

    def load_state_from_peers(self, timeout: float | None = None, max_donors: int = 4, **kwargs: Any) -> bool:
        """Download parameters, optimizer and scheduler state and the epoch from the most advanced donors.

        Returns True if the state was replaced; False (logged) if no donor could provide it in time.
        """
        timeout = self.load_state_timeout if timeout is None else timeout
        self._wait_pending_step()
        node = self.dht.node
        self.tracker.pause_throughput()
        try:
            got = self._run(lambda: download_state(node.endpoint, node, self.run_id, timeout=timeout,
                                                   max_donors=max_donors, exclude=node.peer_id,
                                                   expect=self._manifest_check()), timeout + 10.0)
        except (StateUnavailable, TimeoutError, concurrent.futures.TimeoutError) as e:
            return self._download_failed(f"could not load state from peers: {e}")
        try:
            self._install_state(got.epoch, got.meta, got.tensors)
        except (StateMismatch, ValueError, TypeError, KeyError) as e:
            return self._download_failed(f"refused the downloaded state: {e}")
        self.state_downloads += 1
        self.failed_downloads = 0
        self.last_download = {"epoch": got.epoch, "donors": got.donors, "failed_donors": got.failed_donors}
        self._log("loaded state of epoch %d from %d donors (%d failed)", got.epoch, len(got.donors), got.failed_donors)
        return True

    def _download_failed(self, why: str) -> bool:
        """Log, and back off (doubling, up to a minute) before the next automatic attempt."""
        self.failed_downloads += 1
        backoff = min(60.0, 2.0 ** min(self.failed_downloads, 6))
        self._next_load_attempt = time.monotonic() + backoff
        logger.warning("%s: %s; training on, next attempt in %.0f s", self.run_id, why, backoff)
        return False

    def _manifest_check(self) -> Callable[[list[str], list[tuple[int, ...]], list[torch.dtype]], None] | None:
        """What a donor's manifest must look like before anything is downloaded (None: anything)."""
        return None

    def _state_for_donation(self) -> tuple[int, dict[str, Any], list[tuple[str, torch.Tensor]]]:
        raise NotImplementedError

    def _install_state(self, epoch: int, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _background_work(self) -> list[concurrent.futures.Future]:
        """Background rounds or steps still running (finished within ``shutdown_timeout`` at shutdown)."""
        return []

    def _averager_cores(self) -> list[AveragerCore]:
        return []

    def shutdown(self) -> None:
        """Finish background work (within ``shutdown_timeout``), withdraw from the swarm, stop serving."""
        if self._closed:
            return
        self._closed = True
        for pending in self._background_work():
            with contextlib.suppress(Exception):
                pending.result(self.shutdown_timeout)
        self._background.shutdown(wait=False, cancel_futures=True)
        if not self.dht.is_alive:
            return

        async def stop() -> None:
            await self.state_server.close()
            await self.tracker.close()
            for core in self._averager_cores():
                await core.close()

        with contextlib.suppress(Exception):
            self._run(stop, self.shutdown_timeout + 5.0)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
