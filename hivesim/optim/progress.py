"""How far the swarm is toward its next epoch: every peer publishes its own progress, everyone sums.

Each peer stores its progress under ``{run_id}_progress`` in a subkey carrying its owner marker, so the
DHT checks the writer's signature: no peer can forge or erase another's record, and records without a
marker are ignored. The swarm's epoch is the largest epoch of a peer that is not in client mode; the
samples toward ``target_batch_size`` are summed over the peers at that epoch and extrapolated from their
throughput between reads, so every peer decides at about the same moment that the target is reached.
Reads come sooner when the target is near and seldom when it is far.

:class:`ProgressTracker` lives in the network's event loop; the training thread reports its progress
with :meth:`ProgressTracker.report_local_progress` and reads :attr:`ProgressTracker.global_progress`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hivesim.dht.node import DHTNode
from hivesim.dht.storage import get_dht_time
from hivesim.averaging.state_sharing import MAX_EPOCH
from hivesim.dht.validation import owner_marker, owner_of_subkey
from hivesim.net.identity import peer_id_from_public_key

logger = logging.getLogger(__name__)

MAX_SAMPLES = 1 << 40
MAX_THROUGHPUT = 1e9  # samples/s; a record claiming more is clamped


class ProgressRecord(BaseModel):
    """What one peer publishes about itself (the schema every reader checks)."""

    model_config = ConfigDict(extra="forbid")
    epoch: int = Field(ge=0, le=MAX_EPOCH)
    samples: int = Field(ge=0, le=MAX_SAMPLES)
    sps: float = Field(ge=0.0, allow_inf_nan=False)
    time: float = Field(allow_inf_nan=False)
    client: bool = False
    aux: bool = False
    left: bool = False  # the peer withdrew (a newer record, since the latest expiration wins)
    averaging: bool = False  # the peer has ended this epoch and is averaging: the others should join it now


def set_from_any_thread(loop: asyncio.AbstractEventLoop | None, event: asyncio.Event) -> None:
    """``event.set()`` in ``loop`` from whatever thread (a training thread wakes a network loop); a loop that is
    gone is ignored."""
    if loop is not None and not loop.is_closed():
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # closed meanwhile
            pass


@dataclass(frozen=True)
class GlobalProgress:
    """The swarm's progress as last read (``samples_accumulated`` is extrapolated to ``time``)."""

    epoch: int
    samples_accumulated: int
    target_batch_size: int
    num_peers: int  # peers with a live record at ``epoch`` (all modes)
    num_clients: int
    samples_per_second: float  # summed over the peers at ``epoch``
    eta_next_epoch: float  # DHT time at which the target should be reached
    next_fetch_time: float
    time: float = 0.0
    peers: dict[bytes, ProgressRecord] = field(default_factory=dict, repr=False)  # peer id -> record, all epochs


@dataclass
class LocalProgress:
    """This peer's own numbers (what it publishes)."""

    epoch: int = 0
    samples: int = 0
    samples_per_second: float = 0.0
    time: float = 0.0
    client: bool = False
    aux: bool = False
    averaging: bool = False


class _Throughput:
    """Samples per second as a moving average over recent steps."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self.smoothing = smoothing
        self.value = 0.0
        self._last: float | None = None

    def add(self, samples: int, now: float) -> float:
        if self._last is not None and samples > 0:
            dt = max(now - self._last, 1e-6)
            rate = samples / dt
            self.value = rate if self.value == 0 else (1 - self.smoothing) * self.value + self.smoothing * rate
        self._last = now
        return self.value

    def pause(self) -> None:
        """Averaging or loading state is not training: do not count that time against throughput."""
        self._last = None


class ProgressTracker:
    """Publishes this peer's progress and reads everyone's (asyncio; one per run per peer).

    Args:
        dht: the peer's DHT node.
        run_id: the training run's name; peers with the same run id train together.
        target_batch_size: samples the swarm accumulates per epoch.
        client_mode, auxiliary: what this peer is (published, so others count it right).
        min_refresh_period, max_refresh_period: bounds of the adaptive time between reads.
        expiration: seconds a progress record lives without being refreshed (a dead peer stops counting).
        publish_period: least seconds between two stores of unchanged-epoch progress.
    """

    def __init__(self, dht: DHTNode, run_id: str, target_batch_size: int, *, client_mode: bool = False,
                 auxiliary: bool = False, min_refresh_period: float = 0.05, max_refresh_period: float = 10.0,
                 expiration: float = 30.0, publish_period: float = 0.5) -> None:
        if target_batch_size <= 0:
            raise ValueError(f"target_batch_size must be positive, got {target_batch_size}")
        if not 0 < min_refresh_period <= max_refresh_period:
            raise ValueError("need 0 < min_refresh_period <= max_refresh_period")
        self.dht = dht
        self.run_id = run_id
        self.key = f"{run_id}_progress"
        self.subkey = owner_marker(dht.public_key)
        self.target_batch_size = int(target_batch_size)
        self.min_refresh_period = min_refresh_period
        self.max_refresh_period = max_refresh_period
        self.expiration = expiration
        self.publish_period = publish_period
        self.local = LocalProgress(time=get_dht_time(), client=client_mode, aux=auxiliary)
        self.throughput = _Throughput()
        self.global_progress = GlobalProgress(0, 0, self.target_batch_size, 0, 0, 0.0, math.inf, get_dht_time())
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._published: tuple[int, int] | None = None
        self._published_at = 0.0
        self._published_sps = 0.0
        self.epoch_started: float | None = None  # DHT time this peer entered its current epoch
        self.jumped_in = False  # ...by more than one epoch (a state download), not by a transition with the others
        self.epoch_seconds: float | None = None  # how long this peer's last epoch took
        self._fetch_now = True
        self.reads = 0
        self.stores = 0
        self.ignored_records = 0

    # ------------------------------------------------------------------ lifecycle (in the loop)

    async def start(self) -> "ProgressTracker":
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name=f"progress.{self.run_id}")
        return self

    async def close(self, withdraw: bool = True) -> None:
        """Stop; ``withdraw`` replaces this peer's record by a "left" one (others stop counting it at once)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if withdraw:
            try:  # the latest expiration wins: the withdrawal must outlive the record it replaces
                await asyncio.wait_for(self._store(get_dht_time() + self.expiration + 1.0, left=True), 2.0)
            except Exception:
                pass

    # ------------------------------------------------------------------ from the training thread

    async def announce_transition(self) -> None:
        """Publish at once that this peer ended its epoch and is averaging: peers still accumulating for it
        join now instead of when their own estimate says so (with short epochs, estimates lag behind)."""
        self.local.averaging = True
        self.local.time = get_dht_time()
        await self._publish()

    def report_local_progress(self, epoch: int, samples: int, *, new_samples: int = 0) -> None:
        """This peer is at ``epoch`` with ``samples`` accumulated in it (``new_samples`` just added). Thread-safe."""
        now = get_dht_time()
        changed_epoch = epoch != self.local.epoch
        if changed_epoch:
            self.local.averaging = False
            one_epoch = self.epoch_started is not None and epoch == self.local.epoch + 1  # (not a download's jump)
            self.epoch_seconds = now - self.epoch_started if one_epoch else self.epoch_seconds
            self.epoch_started, self.jumped_in = now, not one_epoch
        self.local.samples_per_second = self.throughput.add(new_samples, now) if new_samples else self.local.samples_per_second
        self.local.epoch, self.local.samples, self.local.time = int(epoch), int(samples), now
        if changed_epoch:
            self._fetch_now = True
        self._poke()

    def pause_throughput(self) -> None:
        self.throughput.pause()

    def request_refresh(self) -> None:
        """Read the swarm's progress as soon as possible. Thread-safe."""
        self._fetch_now = True
        self._poke()

    def _poke(self) -> None:
        set_from_any_thread(self._loop, self._wake)

    @property
    def global_epoch(self) -> int:
        return self.global_progress.epoch

    def estimated_samples(self, now: float | None = None, epoch: int | None = None) -> float:
        """Samples the swarm has accumulated toward ``epoch``'s target (default: this peer's epoch) by ``now``
        (DHT time): this peer's own exact figure, the others' extrapolated from their throughput since their
        record. A training peer re-publishes every ``publish_period``; an older record belongs to a peer that
        stopped (it waits for the transition), so it is extrapolated no further than that."""
        now = get_dht_time() if now is None else now
        progress = self.global_progress
        epoch = self.local.epoch if epoch is None else epoch
        if epoch < progress.epoch:
            return 0.0
        total = float(self.local.samples) if epoch == self.local.epoch else 0.0
        for peer_id, record in progress.peers.items():
            if peer_id == self.dht.peer_id or record.epoch != epoch:
                continue
            horizon = min(now - record.time, 1.5 * self.publish_period)
            total += record.samples + min(record.sps, MAX_THROUGHPUT) * max(0.0, horizon)
        return total

    @property
    def staleness(self) -> float:
        """Seconds since the swarm's progress was last read."""
        return get_dht_time() - self.global_progress.time

    async def refresh(self) -> GlobalProgress:
        """Read the swarm's progress now."""
        await self._fetch()
        return self.global_progress

    def _next_fetch_time(self) -> float:
        """When to read again: about halfway to the moment the target should be reached by the current
        estimate (own progress included), within the refresh bounds; soon while peers that were at the
        previous epoch have not been seen at this one yet (they are finishing the same transition)."""
        now = get_dht_time()
        progress = self.global_progress
        epoch = self.local.epoch
        others = [r for pid, r in progress.peers.items() if pid != self.dht.peer_id and not r.aux]
        if any(r.epoch == epoch - 1 for r in others):
            return progress.time + self.min_refresh_period
        wait = min(self._longest_wait(), max(self.min_refresh_period, 0.5 * self._time_to_target(now)))
        return min(progress.next_fetch_time, progress.time + wait)

    def _longest_wait(self) -> float:
        """An estimate from an old view can be far off (peers it did not see, peers that stopped to average):
        read at least four times an epoch (twice a second before the first epoch's length is known)."""
        epoch = self.epoch_seconds
        return min(self.max_refresh_period, max(self.min_refresh_period, 0.25 * epoch if epoch else 0.5))

    def ready_to_update_epoch(self) -> bool:
        """The swarm reached ``target_batch_size`` at this peer's epoch, moved past it, or a peer at this epoch
        has ended it and is averaging."""
        progress = self.global_progress
        if progress.epoch > self.local.epoch or self.estimated_samples() >= self.target_batch_size:
            return True
        return any(r.averaging and r.epoch == self.local.epoch for pid, r in progress.peers.items() if pid != self.dht.peer_id)

    def started_without_me(self, epoch: int) -> bool:
        """This peer jumped into ``epoch`` (a state download) after every other peer there had announced its
        averaging: their group formed without it, and waiting for it would be futile. (A peer that entered by a
        transition may see announcements older than its entry with one-step epochs; it is counted on.)"""
        if not self.jumped_in:
            return False
        me = self.dht.peer_id
        others = [r for pid, r in self.global_progress.peers.items() if pid != me and r.epoch == epoch]
        started = self.epoch_started
        return bool(others) and started is not None and all(r.averaging and r.time < started for r in others)

    def peers_around(self, epoch: int) -> int:
        """Peers to expect in ``epoch``'s averaging: those at it, and those whose last record says the epoch
        before (with short epochs a read often predates their move; a peer that is really behind makes the
        round wait until its early start instead of ending it at once without the others)."""
        now = get_dht_time()
        fresh = 4 * self.publish_period
        peers = {pid for pid, r in self.global_progress.peers.items()
                 if r.epoch == epoch or (r.epoch == epoch - 1 and now - r.time < fresh)}
        return len(peers | {self.dht.peer_id})

    def peers_at(self, epoch: int) -> int:
        """Live peers whose record says ``epoch`` (this peer included)."""
        peers = {pid for pid, r in self.global_progress.peers.items() if r.epoch == epoch}
        return len(peers | {self.dht.peer_id})

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while True:
            now = get_dht_time()
            if self._should_publish(now):
                await self._publish()
            if self._fetch_now or get_dht_time() >= self._next_fetch_time():
                self._fetch_now = False
                await self._fetch()
            self._wake.clear()
            next_publish = self._published_at + (self.publish_period if (self.local.epoch, self.local.samples) != self._published
                                                 else self.expiration / 3)
            sleep = min(self._next_fetch_time(), next_publish) - get_dht_time()
            if self._fetch_now:
                sleep = 0.0
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.01, min(sleep, self.max_refresh_period)))
            except asyncio.TimeoutError:
                pass

    def _should_publish(self, now: float) -> bool:
        """A new epoch at once; a first throughput at once (others extrapolate from it); other progress at
        most every ``publish_period``; an unchanged record before it expires."""
        state = (self.local.epoch, self.local.samples)
        if self._published is None or state[0] != self._published[0]:
            return True
        if self._published_sps == 0.0 and self.local.samples_per_second > 0:
            return True
        since = now - self._published_at
        if state == self._published:
            return since >= self.expiration / 3
        # near the target, publish more often: others decide from these records when the epoch ends
        return since >= min(self.publish_period, max(self.min_refresh_period, 0.25 * self._time_to_target(now)))

    def _time_to_target(self, now: float) -> float:
        """Seconds until the swarm should reach the target at this peer's epoch, by the current estimate."""
        progress = self.global_progress
        sps = self.local.samples_per_second + sum(
            min(r.sps, MAX_THROUGHPUT) for pid, r in progress.peers.items()
            if pid != self.dht.peer_id and r.epoch == self.local.epoch and not r.aux)
        missing = self.target_batch_size - self.estimated_samples(now)
        return max(0.0, missing) / sps if sps > 0 else self.max_refresh_period

    async def _publish(self) -> None:
        self._published_sps = self.local.samples_per_second
        self._published = (self.local.epoch, self.local.samples)
        self._published_at = get_dht_time()
        await self._store(self._published_at + self.expiration)

    async def _store(self, expiration_time: float, left: bool = False) -> None:
        local = self.local
        record = {"epoch": local.epoch, "samples": local.samples, "sps": float(local.samples_per_second),
                  "time": local.time, "client": local.client, "aux": local.aux, "left": left,
                  "averaging": local.averaging}
        try:
            await self.dht.store(self.key, record, expiration_time, subkey=self.subkey)
            self.stores += 1
        except Exception as e:  # a store that fails is retried at the next publish
            logger.debug("progress store failed: %r", e)

    async def _fetch(self) -> None:
        try:
            found = await self.dht.get(self.key, latest=True)
        except Exception as e:
            logger.debug("progress read failed: %r", e)
            found = None
        self.global_progress = self.summarize(found.value if found is not None and isinstance(found.value, dict) else {})
        self.reads += 1

    def summarize(self, entries: dict[Any, Any]) -> GlobalProgress:
        """The swarm's progress from the subkeys under the progress key (bad or unowned entries ignored)."""
        now = get_dht_time()
        peers: dict[bytes, ProgressRecord] = {}
        for subkey, item in entries.items():
            owner = owner_of_subkey(subkey)
            value = getattr(item, "value", None)
            expiration = getattr(item, "expiration_time", 0.0)
            if owner is None or expiration <= now:
                self.ignored_records += owner is None
                continue
            try:
                record = ProgressRecord.model_validate(value)
            except ValidationError:
                self.ignored_records += 1
                continue
            if not record.left:
                peers[peer_id_from_public_key(owner)] = record
        me = self.local
        peers[self.dht.peer_id] = ProgressRecord(epoch=me.epoch, samples=me.samples, sps=me.samples_per_second,
                                                 time=me.time, client=me.client, aux=me.aux, averaging=me.averaging)
        servers = [r.epoch for r in peers.values() if not r.client]
        epoch = max(servers) if servers else max(r.epoch for r in peers.values())
        at_epoch = [r for r in peers.values() if r.epoch == epoch]
        samples = sum(r.samples for r in at_epoch)
        sps = sum(min(r.sps, MAX_THROUGHPUT) for r in at_epoch if not r.aux)
        missing = max(0, self.target_batch_size - samples)
        eta = now + (missing / sps if sps > 0 else self.max_refresh_period)
        # read again about when the target should be reached: sooner when it is near, never too often
        wait = min(self.max_refresh_period, max(self.min_refresh_period, 0.5 * (eta - now)))
        return GlobalProgress(epoch=epoch, samples_accumulated=samples, target_batch_size=self.target_batch_size,
                              num_peers=len(at_epoch), num_clients=sum(r.client for r in at_epoch),
                              samples_per_second=sps, eta_next_epoch=eta, next_fetch_time=now + wait, time=now,
                              peers=peers)

    def status(self) -> dict[str, Any]:
        g = self.global_progress
        return {"epoch": self.local.epoch, "global_epoch": g.epoch, "global_samples": g.samples_accumulated,
                "peers": g.num_peers, "samples_per_second": round(g.samples_per_second, 1)}
