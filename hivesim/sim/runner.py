"""The experiment runner: topology in, results folder out.

It starts a local Ray by itself unless given a cluster, places peers in :class:`PeerHost` actors,
bootstraps the DHT, starts the workload, replays the seeded churn/fault schedule, collects every
peer's metrics as it goes (a peer about to be killed is drained first, so its metrics survive it),
and always cleans up — on success, failure or Ctrl-C — before writing the results folder:

    <results_dir>/<name>-<YYYYmmdd-HHMMSS>/
        config.yaml     the resolved topology (after overrides)
        events.jsonl    churn and fault events: scheduled time, actual time, what happened
        samples.jsonl   every measurement every peer took (the workload's metrics)
        peers.jsonl     per peer incarnation: counters, RPC statistics, shaper error
        summary.json    the run's headline numbers
        *.png           figures made by ``analysis/<workload>.py``
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import math
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import yaml

from hivesim.net.identity import Identity
from hivesim.net.rpc import measure_loopback
from hivesim.sim.actor import PeerHost
from hivesim.sim.network import LatencyModel, emulated_bandwidth, link_params
from hivesim.sim.progress import Progress
from hivesim.sim.schedule import Event, build_schedule
from hivesim.sim.topology import Topology, TopologyError, check_runnable, load_topology

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    """What a run collected; handed to the workload's ``summarize`` and the analysis figures."""

    topology: Topology
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    peers: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = 0.0  # wall time (time.time()) of the schedule's t = 0: the run's clock

    def clock(self, wall: float) -> float:
        """Seconds on the run's clock (the schedule's time) of a wall-clock timestamp."""
        return wall - self.started_at

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["name"] == name]


class RunInterrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C); what was collected is in ``run_dir``."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"interrupted; partial results in {run_dir}")
        self.run_dir = run_dir


class RunFailed(RuntimeError):
    """The run failed after it started; what was collected is in ``run_dir``, the cause in ``__cause__``."""

    def __init__(self, run_dir: Path, error: BaseException) -> None:
        super().__init__(f"{error if str(error) else repr(error)} (partial results in {run_dir})")
        self.run_dir = run_dir
        self.error = error


@dataclass
class _Slot:
    """A peer name and where it currently lives."""

    name: str
    group: str
    host: Any = None  # the actor handle
    alive: bool = False
    address: str = ""
    identity: bytes = b""
    incarnation: int = 0


def run(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, results_dir: str | None = None,
        address: str | None = None, progress: bool = True) -> Path:
    """Run the topology at ``path``; returns the results folder.

    Everything the run will import or instantiate is checked first (:func:`check_runnable`), and the
    cluster's resources against what the actors ask; those problems raise :class:`TopologyError` before
    any actor starts or any folder is made. Later, :class:`RunInterrupted` (Ctrl-C) and :class:`RunFailed`
    come after the results folder was written."""
    topology, resolved = load_topology(path, overrides)
    check_runnable(topology, path, overrides)
    runner = Runner(topology, resolved, Path(path), results_dir=results_dir, address=address, progress=progress)
    return asyncio.run(runner.run())


class Runner:
    def __init__(self, topology: Topology, resolved: dict[str, Any], source: Path, *, results_dir: str | None = None,
                 address: str | None = None, progress: bool = True) -> None:
        self.topology = topology
        self.resolved = resolved
        self.source = source
        self.address = address if address is not None else topology.ray.address
        self.shaping = topology.network.shaping and self.address is None
        root = Path(results_dir or topology.results_dir)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = root / f"{topology.name}-{stamp}"
        self.progress = Progress(topology.duration, enabled=progress)
        self.rng = random.Random(f"{topology.seed}:runner")
        self.data = RunData(topology)
        self.slots: dict[str, _Slot] = {}
        self._peer_index: dict[tuple[str, int], dict[str, Any]] = {}  # data.peers by (peer, incarnation)
        self._peer_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # one peer's events in order
        self.hosts: list[Any] = []
        self.started_ray = False
        self.workload = _load_workload(topology.workload.module)
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------ the run

    async def run(self) -> Path:
        topology = self.topology
        schedule = build_schedule(topology)
        latency, link_kwargs, stragglers = link_params(topology, topology.seed) if self.shaping else (None, {}, {})
        self.summary["host"] = await self._check_host_bandwidth(link_kwargs)
        try:
            self._start_ray()
            self._check_resources()
        except BaseException:
            self._shutdown_ray()
            raise
        # only now, with everything checked, does the run leave a folder behind
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.resolved, sort_keys=False))
        self._events = open(self.run_dir / "events.jsonl", "w")
        self._samples = open(self.run_dir / "samples.jsonl", "w")
        interrupted = False
        error: BaseException | None = None
        wall = time.time()
        try:
            self.progress.note(f"starting {len(topology.peer_names())} peers")
            t0 = time.monotonic()
            await self._create_slots(latency, link_kwargs, stragglers)
            self.summary["actors_start_s"] = round(time.monotonic() - t0, 2)
            self.summary["actors_at_start"] = len(self.hosts)
            await self._bootstrap()
            await self._start_workload(list(self.slots))
            await self._main_loop(schedule)
        except (KeyboardInterrupt, asyncio.CancelledError):
            interrupted = True
            self.progress.note("interrupted: stopping every peer and writing what was collected")
        except BaseException as e:
            error = e
        finally:
            try:
                await asyncio.shield(self._finish())
            except BaseException as e:  # never leave Ray behind
                logger.error("cleanup failed: %r", e)
            self._shutdown_ray()
            self._events.close()
            self._samples.close()
        self.summary.update(self._summarize(time.time() - wall, interrupted, error))
        (self.run_dir / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
        figures = self._figures()
        self.progress.done(self.summary, self.run_dir, figures)
        if interrupted:
            raise RunInterrupted(self.run_dir)
        if error is not None:
            raise RunFailed(self.run_dir, error) from error
        return self.run_dir

    def _start_ray(self) -> None:
        if ray.is_initialized():
            return
        wanted = sum(g.num_cpus * math.ceil(g.count / g.peers_per_actor) for g in self.topology.groups.values())
        root = str(Path.cwd())
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))}}
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False, runtime_env=env)
        if self.address is None:
            # logical CPUs are bookkeeping: let every fractional actor fit on this machine
            kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(wanted), int(self.topology.ray.num_cpus or 0))
        else:
            kwargs["address"] = self.address
        try:
            ray.init(**kwargs)
        except Exception as e:
            if self.address is None or not _auth_failure(e):
                raise
            raise ConnectionError(
                f"the Ray cluster at {self.address} refused this client: its authentication token is missing or wrong "
                "(Ray >= 2.60 clusters use token authentication where a token exists, and a client given an address "
                "only sends one when told to). Give this machine the cluster's token "
                "and turn the mode on: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the output of 'ray get-auth-token' "
                "on the head node> (or put it in ~/.ray/auth_token)") from None
        self.started_ray = True

    def _shutdown_ray(self) -> None:
        if self.started_ray and ray.is_initialized():
            ray.shutdown()

    def _demand(self) -> tuple[dict[str, float], list[tuple[str, dict[str, float]]]]:
        """What the topology's actors ask of Ray: in total, and one actor of each group."""
        total: dict[str, float] = defaultdict(float)
        per_actor = []
        for name, spec in self.topology.groups.items():
            one = {"CPU": spec.num_cpus, **{k: float(v) for k, v in spec.resources.items() if k != "CPU"}}
            per_actor.append((name, one))
            for key, value in one.items():
                total[key] += value * math.ceil(spec.count / spec.peers_per_actor)
        return dict(total), per_actor

    def _check_resources(self) -> None:
        """Refuse, up front and with what is missing, a topology whose actors the cluster cannot hold
        (Ray would leave them pending forever); warn when they fit but the cluster is busy right now."""
        total, per_actor = self._demand()
        have = ray.cluster_resources()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        problems = []
        for key, need in sorted(total.items()):
            if need > have.get(key, 0.0) + 1e-9:
                groups = ", ".join(f"{g}: {math.ceil(s.count / s.peers_per_actor)} actors x {one.get(key, 0):g}"
                                   for (g, one), s in zip(per_actor, self.topology.groups.values()) if one.get(key))
                problems.append(f"{need:g} {key} ({groups}), the cluster has {have.get(key, 0.0):g}")
        for group, one in per_actor:
            if nodes and not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in one.items()) for node in nodes):
                problems.append(f"one actor of group {group!r} asks for {_fmt_resources(one)}, "
                                "which no single node of the cluster has")
        if problems:
            raise TopologyError(
                "the cluster cannot hold this topology's actors: it asks for " + "; ".join(problems)
                + ". Add nodes or resources, or lower groups.<name>.num_cpus / raise peers_per_actor / fewer peers "
                "(cluster: " + _fmt_resources(have) + ")")
        free = ray.available_resources()
        short = [k for k, need in total.items() if need > free.get(k, 0.0) + 1e-9]
        if short:
            self.progress.note(f"the cluster is busy: {', '.join(short)} not free for every actor now "
                               f"({_fmt_resources(free)} free); actors that cannot be placed within "
                               f"{self.topology.actor_timeout:g} s fail the run")

    async def _bounded(self, awaitable: Any, what: str, timeout: float | None = None) -> Any:
        """Await an actor call for at most ``timeout`` (default ``actor_timeout``) seconds: a stuck actor
        fails the run with a message instead of hanging it."""
        timeout = self.topology.actor_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(_awaitable(awaitable), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{what} did not finish within {timeout:g} s (topology key actor_timeout)") from None

    async def _check_host_bandwidth(self, link_kwargs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Refuse a topology whose shaped links together would move more than this host can."""
        emulated = emulated_bandwidth(link_kwargs) if link_kwargs else None
        info: dict[str, Any] = {"emulated_uplink_total_Bps": emulated}
        if emulated is None or not self.topology.network.check_host_bandwidth:
            return info
        measured = await measure_loopback()
        info["measured_loopback_Bps"] = measured
        if emulated > 0.5 * measured:
            raise TopologyError(
                f"the topology's uplinks add up to {emulated / 1e6:.0f} MB/s, but this host moves about "
                f"{measured / 1e6:.0f} MB/s over loopback: the emulation would not be faithful. Lower the "
                "bandwidths, use fewer peers, or set network.check_host_bandwidth=false to run anyway."
            )
        return info

    async def _create_slots(self, latency: LatencyModel | None, link_kwargs: dict, stragglers: dict[str, float]) -> None:
        remote = ray.remote(PeerHost)
        latency_ref = ray.put(latency) if latency is not None else None
        self._remote, self._latency_ref = remote, latency_ref
        for group, spec in self.topology.groups.items():
            names = [f"{group}.{i}" for i in range(spec.count)]
            for start in range(0, len(names), spec.peers_per_actor):
                host = self._new_host(group)
                for name in names[start : start + spec.peers_per_actor]:
                    self.slots[name] = _Slot(name, group, host, identity=Identity().private_bytes())
        self._link_kwargs = link_kwargs
        self._stragglers = stragglers
        waiting = [asyncio.ensure_future(_awaitable(h.ready.remote())) for h in self.hosts]
        done, pending = await asyncio.wait(waiting, timeout=self.topology.actor_timeout)
        for future in pending:
            future.cancel()
        if pending:
            free = _fmt_resources(ray.available_resources())
            raise TimeoutError(
                f"{len(pending)} of {len(waiting)} peer actors did not start within {self.topology.actor_timeout:g} s "
                f"(actor_timeout): Ray could not place them (free now: {free}); see 'ray status'")
        for future in done:
            future.result()  # an actor that died while starting

    def _new_host(self, group: str) -> Any:
        spec = self.topology.groups[group]
        cluster = self.address is not None
        options: dict[str, Any] = {"num_cpus": spec.num_cpus, "max_restarts": 0}
        if spec.resources:
            options["resources"] = {k: v for k, v in spec.resources.items() if k not in ("CPU", "GPU")}
            if "GPU" in spec.resources:
                options["num_gpus"] = spec.resources["GPU"]
        host = self._remote.options(**options).remote(self._latency_ref, "0.0.0.0" if cluster else "127.0.0.1", None)
        self.hosts.append(host)
        return host

    def _peer_spec(self, slot: _Slot) -> dict[str, Any]:
        group = self.topology.groups[slot.group]
        return {
            "roles": group.roles,
            "dht": group.dht,
            "links": self._link_kwargs.get(slot.name) if self.shaping else None,
            "identity": slot.identity,
            "slowdown": self._stragglers.get(slot.name, 1.0),
            "endpoint": {**group.endpoint, "encryption": self.topology.network.encryption},
        }

    async def _start_peer(self, slot: _Slot, initial: list[str]) -> None:
        slot.address = await self._bounded(slot.host.start_peer.remote(slot.name, self._peer_spec(slot), initial),
                                           f"starting peer {slot.name}")
        slot.alive = True
        slot.incarnation += 1

    REJOIN_ATTEMPTS = 3
    BOOTSTRAP_WAVE = 8  # the first wave's size; later waves are as large as the swarm already up ...
    BOOTSTRAP_MAX_WAVE = 128  # ... up to this many peers joining at once

    async def _bootstrap(self) -> None:
        """First peer alone, then waves that join through 3 random peers already up. A wave is as large as
        the swarm already up (at least 8, at most 128 peers), so the swarm doubles each wave: 1,024 peers join
        in about 12 waves instead of 128 waves of 8, and no wave outnumbers the peers it joins through by more
        than 8 to 1."""
        order = [s for s in self.slots.values() if self.topology.groups[s.group].join_at == 0]
        if not order:
            raise TopologyError("every group has a join_at: at least one group must start at time 0")
        t0 = time.monotonic()
        deadline = t0 + self.topology.bootstrap_timeout
        await self._start_peer(order[0], [])
        up = [order[0].address]
        start, waves = 1, 1
        while start < len(order):
            wave = min(max(self.BOOTSTRAP_WAVE, len(up)), self.BOOTSTRAP_MAX_WAVE)
            batch = order[start : start + wave]
            start += len(batch)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"bootstrap took longer than {self.topology.bootstrap_timeout} s "
                                   f"({len(up)}/{len(order)} peers up; topology key bootstrap_timeout)")
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(self._start_peer(s, self.rng.sample(up, min(3, len(up)))) for s in batch)), left)
            except asyncio.TimeoutError:
                raise TimeoutError(f"bootstrap took longer than {self.topology.bootstrap_timeout} s "
                                   f"({len(up)}/{len(order)} peers up; topology key bootstrap_timeout)") from None
            up += [s.address for s in batch]
            waves += 1
            self.progress.note(f"bootstrapped {len(up)}/{len(order)} peers")
        self.summary["bootstrap"] = {"peers": len(order), "waves": waves, "seconds": round(time.monotonic() - t0, 2)}

    async def _start_workload(self, names: list[str]) -> None:
        spec = self.topology.workload
        role = f"{spec.module}:ROLE"
        chosen = [n for n in names if spec.groups is None or self.slots[n].group in spec.groups]
        await self._bounded(
            asyncio.gather(*(_awaitable(self.slots[n].host.add_role.remote(n, role, spec.params))
                             for n in chosen if self.slots[n].alive)),
            f"starting the workload on {len(chosen)} peers")

    async def _main_loop(self, schedule: list[Event]) -> None:
        start = time.monotonic()
        self.data.started_at = time.time()  # the same instant as ``start``: events, samples and figures share it
        pending = list(schedule)
        next_collect = start + self.topology.collect_every
        # a collection runs beside the schedule: busy actors answer slowly, and kills and joins must not wait
        collecting: asyncio.Task | None = None
        applying: set[asyncio.Task] = set()
        try:
            while True:
                now = time.monotonic()
                elapsed = now - start
                due = []
                while pending and pending[0].t <= elapsed:
                    due.append(pending.pop(0))
                if due:  # applied beside the loop: a slow join must not hold up the next events or collections
                    applying.add(asyncio.get_running_loop().create_task(self._apply_all(due, elapsed)))
                for task in [t for t in applying if t.done()]:
                    applying.discard(task)
                    task.result()  # _apply records an event's failure; anything raised here is a bug: surface it
                if collecting is not None and collecting.done():
                    collecting.result()
                    collecting = None
                    if not pending and self._workload_finished():
                        self.summary["finished_early_s"] = round(elapsed, 1)
                        break
                if now >= next_collect and collecting is None:
                    collecting = asyncio.get_running_loop().create_task(self._collect())
                    next_collect = now + self.topology.collect_every
                alive = sum(s.alive for s in self.slots.values())
                self.progress.update(elapsed, alive, len(self.slots), self._headline())
                if elapsed >= self.topology.duration:
                    break
                wake = min(start + self.topology.duration, next_collect, start + pending[0].t if pending else math.inf)
                await asyncio.sleep(max(0.0, min(0.5, wake - time.monotonic())))
        finally:
            if applying:
                await asyncio.gather(*applying)
            if collecting is not None:
                await collecting

    def _workload_finished(self) -> bool:
        """The workload's optional ``finished(run, alive)`` (``alive``: the live peers that run it) says that
        there is nothing left to measure: the run ends before ``duration`` (no scheduled event is left)."""
        finished = getattr(self.workload, "finished", None)
        if finished is None:
            return False
        groups = self.topology.workload.groups
        alive = [n for n, s in self.slots.items() if s.alive and (groups is None or s.group in groups)]
        try:
            return bool(finished(self.data, alive))
        except Exception as e:
            logger.warning("the workload's finished() failed: %r", e)
            return False

    async def _apply_all(self, events: list[Event], elapsed: float) -> None:
        """Apply the events due now: each peer's in order, different peers at once (so 64 peers joining
        together do not queue behind each other), and log them in schedule order."""
        chains: dict[str, list[Event]] = defaultdict(list)
        for event in events:
            chains[event.peer].append(event)  # partitions and heals (peer "") form one chain

        async def apply_chain(peer: str, chain: list[Event]) -> list[dict[str, Any]]:
            # a peer's events due later wait for its earlier ones still being applied (a kill before its
            # rejoin): batches start in schedule order, and a lock hands over to its waiters in turn
            async with self._peer_locks[peer]:
                return [await self._apply(event, elapsed) for event in chain]

        done = await asyncio.gather(*(apply_chain(p, c) for p, c in chains.items()))
        by_event = {id(e): r for chain, records in zip(chains.values(), done) for e, r in zip(chain, records)}
        for event in events:
            record = by_event[id(event)]
            self.data.events.append(record)
            self._events.write(json.dumps(record) + "\n")
        self._events.flush()

    async def _apply(self, event: Event, elapsed: float) -> dict[str, Any]:
        record = {**event.to_dict(), "actual_t": round(elapsed, 3), "wall": time.time()}
        try:
            if event.action == "kill":
                await self._kill(self.slots[event.peer], graceful=event.mode == "graceful")
            elif event.action == "join":
                await self._rejoin(self.slots[event.peer], same_identity=event.identity == "same")
            elif event.action in ("partition", "heal"):
                sides = {p: 1 for p in event.peers} if event.action == "partition" else {}
                await self._bounded(asyncio.gather(*(_awaitable(h.set_sides.remote(sides)) for h in self._live_hosts())),
                                    f"{event.action} on every actor")
            record["ok"] = True
        except Exception as e:
            record["ok"] = False
            record["error"] = repr(e)
            logger.warning("event %s failed: %r", event, e)
        return record

    async def _kill(self, slot: _Slot, graceful: bool) -> None:
        if not slot.alive:
            return
        alone = sum(1 for s in self.slots.values() if s.host is slot.host and s.alive) == 1
        if graceful or not alone:
            await self._bounded(slot.host.stop_peer.remote(slot.name, graceful), f"stopping peer {slot.name}")
            await self._collect([slot.host])
        else:
            await self._collect([slot.host])  # its metrics must not die with it
            ray.kill(slot.host, no_restart=True)  # the process vanishes: no goodbye
            self.hosts.remove(slot.host)
            slot.host = None
        slot.alive = False

    async def _rejoin(self, slot: _Slot, same_identity: bool) -> None:
        if slot.alive:
            return
        if slot.host is None:
            slot.host = self._new_host(slot.group)
            await self._bounded(slot.host.ready.remote(), f"starting an actor for {slot.name} (can Ray place it?)")
        if not same_identity:
            slot.identity = Identity().private_bytes()
        for attempt in range(self.REJOIN_ATTEMPTS):
            # a busy swarm may leave a few pings unanswered: join through 8 live peers, and try again through
            # others when none of them answered (a peer that cannot join would stay dead for the rest of the run)
            live = [s.address for s in self.slots.values() if s.alive]
            try:
                await self._start_peer(slot, self.rng.sample(live, min(8, len(live))))
                break
            except TimeoutError:
                raise  # the actor itself did not answer within actor_timeout: retrying would not help
            except Exception as e:
                if attempt == self.REJOIN_ATTEMPTS - 1:
                    raise
                logger.info("peer %s could not rejoin (%r); trying other peers", slot.name, e)
        await self._start_workload([slot.name])

    def _live_hosts(self) -> list[Any]:
        return list({id(s.host): s.host for s in self.slots.values() if s.host is not None}.values())

    async def _collect(self, hosts: list[Any] | None = None) -> None:
        hosts = hosts if hosts is not None else self._live_hosts()
        results = await asyncio.gather(*(self._bounded(h.drain.remote(), "collecting metrics") for h in hosts),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("could not collect metrics from an actor: %r", result)
                continue
            for item in result:
                for sample in item["samples"]:
                    self._samples.write(json.dumps(sample) + "\n")
                self.data.samples.extend(item["samples"])
                self.data.events.extend({**e, "source": "peer"} for e in item["events"])
                self._note_peer(item)
        self._samples.flush()

    def _note_peer(self, item: dict[str, Any]) -> None:
        """Keep the latest counters of each peer incarnation."""
        slot = self.slots.get(item["peer"])
        key = (item["peer"], slot.incarnation if slot else 0)
        existing = self._peer_index.get(key)
        if existing is not None:
            existing.update(counters=item["counters"], rpc=item.get("rpc"), shaping=item.get("shaping"))
            return
        self._peer_index[key] = {"peer": item["peer"], "incarnation": key[1], "counters": item["counters"],
                                 "rpc": item.get("rpc"), "shaping": item.get("shaping")}
        self.data.peers.append(self._peer_index[key])

    async def _finish(self) -> None:
        hosts = self._live_hosts()
        if not hosts:
            return
        memory = await asyncio.gather(*(self._bounded(h.memory.remote(), "memory") for h in hosts), return_exceptions=True)
        self.summary["actors"] = [m for m in memory if isinstance(m, dict)]
        group_of = {id(s.host): s.group for s in self.slots.values() if s.host is not None}
        for host, m in zip(hosts, memory):
            if isinstance(m, dict):
                m["group"] = group_of.get(id(host))
        await self._collect(hosts)
        await asyncio.gather(*(self._bounded(h.stop_all.remote(True), "stopping peers") for h in hosts),
                             return_exceptions=True)
        await self._collect(hosts)
        for host in hosts:
            ray.kill(host, no_restart=True)
        self.hosts.clear()
        with open(self.run_dir / "peers.jsonl", "w") as f:
            for peer in self.data.peers:
                f.write(json.dumps(peer) + "\n")

    # ------------------------------------------------------------------ reporting

    def _headline(self) -> str:
        headline = getattr(self.workload, "headline", None)
        if headline is None:
            return ""
        try:
            return headline(self.data)
        except Exception:
            return ""

    def _summarize(self, wall: float, interrupted: bool, error: BaseException | None) -> dict[str, Any]:
        actors = self.summary.get("actors", [])
        out: dict[str, Any] = {
            "name": self.topology.name,
            "seed": self.topology.seed,
            "peers": len(self.slots),
            "actors_at_end": len(actors),  # abruptly killed peers take their actor with them
            "duration_s": self.topology.duration,
            "clock_zero": self.data.started_at or None,  # wall time of the schedule's t = 0 (figures use it)
            "wall_time_s": round(wall, 1),
            "finished_early_s": self.summary.get("finished_early_s"),
            "actors_at_start": self.summary.get("actors_at_start"),
            "actors_start_s": self.summary.get("actors_start_s"),  # Ray starting the actors' processes
            "bootstrap": self.summary.get("bootstrap"),
            "interrupted": interrupted,
            "error": repr(error) if error else None,
            "events": {k: sum(1 for e in self.data.events if e.get("action") == k) for k in ("kill", "join", "partition", "heal")},
            "memory_mib": {
                "actors_total_at_end": round(sum(a["rss_mib"] for a in actors), 1),
                "per_actor_mean": round(sum(a["rss_mib"] for a in actors) / len(actors), 1) if actors else None,
                "per_actor_max": round(max(a["rss_mib"] for a in actors), 1) if actors else None,
                "per_actor_peak_max": round(max(a["peak_mib"] for a in actors), 1) if actors else None,
                "per_peer_mean": round(sum(a["rss_mib"] for a in actors) / max(1, sum(a["peers"] for a in actors)), 2)
                if actors else None,
            },
            "placement": _placement(actors),
            "shaper": _shaper_summary(self.data.peers) if self.shaping else None,
            "link_shaping": self.shaping,
        }
        summarize = getattr(self.workload, "summarize", None)
        if summarize is not None:
            try:
                out["workload"] = summarize(self.data)
            except Exception as e:
                out["workload"] = {"error": f"summarize failed: {e!r}"}
        out["host"] = self.summary.get("host")
        return out

    def _figures(self) -> list[Path]:
        name = self.topology.workload.module.rsplit(".", 1)[-1]
        try:
            analysis = importlib.import_module(f"analysis.{name}")
        except ModuleNotFoundError:
            return []
        try:
            return list(analysis.make_figures(self.run_dir))
        except Exception as e:
            logger.warning("figures failed: %r", e)
            return []


async def _awaitable(ref: Any) -> Any:
    """A coroutine awaiting a Ray ObjectRef (or any awaitable), for ``asyncio.wait_for``/``asyncio.wait``."""
    return await ref


def _placement(actors: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Where the actors ran at the end: ``{group: {ray node id: actors}}`` (what ``resources`` placed)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for actor in actors:
        out[str(actor.get("group"))][str(actor.get("node"))] += 1
    return {group: dict(nodes) for group, nodes in out.items()}


def _auth_failure(error: BaseException) -> bool:
    """Whether ``ray.init`` failed because the cluster wants a (different) authentication token."""
    for _ in range(8):  # the AuthenticationError hides behind a ConnectionError or two
        if error is None:
            return False
        if type(error).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _fmt_resources(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type"))}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "nothing"


def _load_workload(module_name: str) -> Any:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise TopologyError(f"workload.module: cannot import {module_name!r} ({e}); run from the repository root") from None
    if not hasattr(module, "ROLE"):
        raise TopologyError(f"workload.module: {module_name} has no ROLE (the Role each peer runs)")
    return module


def _shaper_summary(peers: list[dict[str, Any]]) -> dict[str, Any]:
    shaped = [p["shaping"] for p in peers if p.get("shaping")]
    count = sum(s["messages"] for s in shaped)
    return {
        "held_messages": count,
        "mean_late_ms": round(sum(s["mean_ms"] * s["messages"] for s in shaped) / count, 3) if count else 0.0,
        "max_late_ms": round(max((s["max_ms"] for s in shaped), default=0.0), 3),
        "share_late_over_1ms": round(sum(s["late_over_1ms"] for s in shaped) / count, 4) if count else 0.0,
    }
