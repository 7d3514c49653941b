"""DHT store/get under concurrency and peer failures: hivesim's DHT, or hivemind's, on the same workload.

    python benchmarks/bench_dht.py [--backend hivesim|hivemind] [--peers 16 --workers 10 --rounds 16
        --stores 8 --gets 8 --failure-rate 0.1 --seed 30 ...] [--json]
    python benchmarks/bench_dht.py --against hivemind [--hivemind-python PATH]   # or HIVEMIND_PYTHON=PATH

The workload is the one of hivemind's own ``benchmarks/benchmark_dht.py`` (same defaults):

* ``--peers`` peers are started one after another, each bootstrapped from the addresses of up to
  ``--initial-peers`` random earlier ones;
* ``int(failure_rate * peers)`` of them are set aside to be killed, each at a random round (out of
  ``workers * rounds``); the others do the work;
* ``--workers`` concurrent workers each run ``--rounds`` rounds of: a fresh random key; ``--stores``
  random peers each store a distinct subkey under it, all at once; then ``--gets`` random peers (drawn
  independently, so they may overlap the storers) all ``get(key, latest=True)`` at once, and a get
  succeeds when it returns exactly the subkeys whose store succeeded, with their values.

Both DHTs store each value on ``--replicas`` nodes (default 5, hivemind's default, which its benchmark
runs with): the work per op grows with it, so a fair comparison sets it the same on both sides.
hivesim's own default is 8 (it survives a third of the swarm failing at once: see ``DHTNode``); run
``--replicas 8`` to compare at that.

A round's store (get) time is the wall time of its parallel stores (gets), as in hivemind's benchmark.
Printed: the time to create the peers, store and get time (mean, std, max), the summed store and get
time per worker, per-call means, success rates, and the total time of the rounds (peer creation not
included). Unlike hivemind's benchmark, killing a peer is timed on its own, not inside the store time of
the round that triggers it (and it runs on a thread, not blocking the other workers). Workers are
coroutines in one event loop, as in hivemind's: they await the ``return_future=True`` futures of either
DHT (for a hivesim without that keyword, its blocking calls are made on a pool of threads).

Where the peers run: hivemind's ``DHT`` is a child process per peer, each with its own p2p daemon (a
second process), so its 16 peers are 32 processes spread over every core. hivesim's ``DHT`` facade runs
all the peers of a process in one event loop, so in one process they share one core; the harness
therefore spreads hivesim's peers over ``--hivesim-procs`` child processes (default: one per core),
driven from here over hivesim RPC, one more RPC per op, counted in hivesim's times. ``--hivesim-procs 1``
keeps every hivesim peer in this process (one core for all).

``--against hivemind`` runs the hivesim backend first, then the same workload, parameters and
seed on hivemind in a subprocess of a Python that has hivemind (``pip install hivemind`` in a separate
venv: it must not share one with hivesim), and prints both with the ratio hivemind / hivesim.

This file imports neither library at module level: each backend imports its own when it is chosen.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import inspect
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from subprocess_group import SubprocessTimeout, run_group

HIVEMIND_SETUP = ("python3 -m venv hivemind-venv && hivemind-venv/bin/pip install torch==2.13.0 && "
                  "hivemind-venv/bin/pip install hivemind==1.1.12 torch==2.13.0")
GOAL_RATIO = 10.0


# ------------------------------------------------------------------------------------------------ threads
class DaemonPool:
    """A fixed set of daemon threads: a call stuck in a backend cannot keep the process from exiting."""

    def __init__(self, size: int, name: str):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(size)
        ]
        for thread in self.threads:
            thread.start()

    def _serve(self) -> None:
        while True:
            item = self.tasks.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except (cf.CancelledError, asyncio.CancelledError) as e:
                # the backend's own future was cancelled: a failed call, not a cancellation of the waiter
                # (asyncio would turn it into a CancelledError of the awaiting task)
                future.set_exception(RuntimeError(f"the call raised {type(e).__module__}.{e!r}"))
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                future.set_exception(e)

    def submit(self, fn, *args, **kwargs) -> cf.Future:
        future: cf.Future = cf.Future()
        self.tasks.put((future, fn, args, kwargs))
        return future

    async def run(self, fn, *args, **kwargs) -> Any:
        """Await a blocking call made on one of the pool's threads."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def close(self) -> None:
        for _ in self.threads:
            self.tasks.put(None)


# ----------------------------------------------------------------------------------------------- backends
# A backend: get_dht_time(); create(initial_peers) -> peer and addresses(peer) -> list, blocking, called before
# the rounds; async store(peer, key, value, expiration_time, subkey) -> bool and async get(peer, key, latest)
# -> ValueWithExpiration | None, awaited by the workers (coroutines in one event loop, as in hivemind's
# benchmark); shutdown(peer), blocking, called on a thread.
class HivesimBackend:
    """hivesim's DHT, in this process. Kept to the public API: ``DHT``, ``get_dht_time``."""

    name = "hivesim"

    def __init__(self, args: argparse.Namespace):
        import hivesim
        from hivesim import DHT, get_dht_time

        self.DHT = DHT
        self.get_dht_time = get_dht_time
        self.version = getattr(hivesim, "__version__", "?")
        # hivemind's shape: store/get(..., return_future=True) hand back a concurrent.futures.Future, awaited
        # here. Without it the blocking calls run on this pool, big enough for every call of a round of
        # every worker at once.
        parameters = inspect.signature(DHT.store).parameters
        self.futures = "return_future" in parameters and "return_future" in inspect.signature(DHT.get).parameters
        self.calls = "return_future" if self.futures else "threads"
        self.replicas = args.replicas
        self.pool = None if self.futures else DaemonPool(args.workers * max(args.stores, args.gets, 1), "hivesim-op")

    def create(self, initial_peers: list) -> Any:
        return self.DHT(initial_peers=list(initial_peers), start=True, num_replicas=self.replicas)

    def addresses(self, peer: Any) -> list:
        return list(peer.get_visible_addresses())

    async def store(self, peer: Any, key: str, value: str, expiration_time: float, subkey: str) -> bool:
        if self.futures:
            return bool(await asyncio.wrap_future(
                peer.store(key, value, expiration_time, subkey=subkey, return_future=True)))
        return bool(await self.pool.run(peer.store, key, value, expiration_time, subkey=subkey))

    async def get(self, peer: Any, key: str, latest: bool) -> Any:
        if self.futures:
            return await asyncio.wrap_future(peer.get(key, latest=latest, return_future=True))
        return await self.pool.run(peer.get, key, latest=latest)

    def shutdown(self, peer: Any) -> None:
        peer.shutdown()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


class HivesimProcsBackend:
    """hivesim's DHT with the peers spread over ``--hivesim-procs`` child processes (peer i in child
    i % N), each child hosting its peers in one event loop and driven from here over hivesim RPC, as
    hivemind's benchmark drives each of its DHT processes over a pipe. It lets hivesim use every core of
    the machine, as hivemind's process per peer (plus its p2p daemon) does; one op costs one more RPC
    (this process -> the child) than in the single-process backend."""

    name = "hivesim"

    def __init__(self, args: argparse.Namespace):
        import hivesim
        from hivesim import Endpoint, ValueWithExpiration, get_dht_time
        from hivesim.dht.facade import _shared_loop

        self.get_dht_time = get_dht_time
        self.ValueWithExpiration = ValueWithExpiration
        self.version = getattr(hivesim, "__version__", "?")
        self.calls = f"{args.hivesim_procs} processes"
        self.loop = _shared_loop.acquire()
        self._shared_loop = _shared_loop
        self.op_timeout = args.op_timeout
        self.replicas = args.replicas
        self.endpoint = self._run(Endpoint(default_timeout=args.op_timeout).start())
        self.children = []
        for _ in range(args.hivesim_procs):
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hivesim-child"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.children.append((proc, proc.stdout.readline().strip()))
        self.created = 0

    def _run(self, coro, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _call(self, child: str, method: str, payload: Any) -> Any:
        return self.endpoint.call(child, method, payload)

    def create(self, initial_peers: list) -> Any:
        child = self.children[self.created % len(self.children)][1]
        self.created += 1
        payload = {"initial": list(initial_peers), "options": {"num_replicas": self.replicas}}
        index, address = self._run(self._call(child, "bench.create", payload))
        return (child, index, address)

    def addresses(self, peer: Any) -> list:
        return [peer[2]]

    async def open_rounds(self) -> None:
        """The rounds' calls leave from an endpoint in the workers' own event loop: a hop to another
        thread's loop and back per op cost this process a quarter of a core, taken from the peers."""
        from hivesim import Endpoint

        self.rounds_endpoint = await Endpoint(default_timeout=self.op_timeout).start()

    async def close_rounds(self) -> None:
        await self.rounds_endpoint.close()

    async def store(self, peer: Any, key: str, value: str, expiration_time: float, subkey: str) -> bool:
        payload = {"peer": peer[1], "key": key, "value": value, "expiration": expiration_time, "subkey": subkey}
        return bool(await self.rounds_endpoint.call(peer[0], "bench.store", payload))

    async def get(self, peer: Any, key: str, latest: bool) -> Any:
        found = await self.rounds_endpoint.call(peer[0], "bench.get", {"peer": peer[1], "key": key, "latest": latest})
        if found is None:
            return None
        value, expiration = found
        if isinstance(value, dict):
            value = {k: self.ValueWithExpiration(v, e) for k, (v, e) in value.items()}
        return self.ValueWithExpiration(value, expiration)

    def shutdown(self, peer: Any) -> None:
        try:
            self._run(self._call(peer[0], "bench.shutdown", {"peer": peer[1]}), 60)
        except Exception:  # noqa: BLE001 - its child may be gone already
            pass

    def close(self) -> None:
        for proc, _ in self.children:
            proc.kill()
            proc.wait()
        self._run(self.endpoint.close())
        self._shared_loop.release()


def hivesim_child() -> None:
    """A child of ``HivesimProcsBackend``: hosts DHT peers, serves the benchmark's calls on them."""
    from hivesim import Endpoint
    from hivesim.dht import DHTNode

    async def main() -> None:
        nodes: list = []
        endpoint = await Endpoint().start()

        async def create(payload, ctx):
            nodes.append(await DHTNode.create(payload["initial"], **payload.get("options", {})))
            return [len(nodes) - 1, nodes[-1].address]

        async def store(payload, ctx):
            node = nodes[payload["peer"]]
            return await node.store(payload["key"], payload["value"], payload["expiration"], subkey=payload["subkey"])

        async def get(payload, ctx):
            found = await nodes[payload["peer"]].get(payload["key"], latest=payload["latest"])
            if found is None:
                return None
            value = found.value
            if isinstance(value, dict):
                value = {k: [v.value, v.expiration_time] for k, v in value.items()}
            return [value, found.expiration_time]

        async def shutdown(payload, ctx):
            await nodes[payload["peer"]].shutdown()
            return True

        for name, handler in (("create", create), ("store", store), ("get", get), ("shutdown", shutdown)):
            endpoint.register(f"bench.{name}", handler)
        print(endpoint.address, flush=True)
        # ends when the parent closes our stdin (or dies), if it does not kill us first
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


class HivemindBackend:
    """hivemind's DHT: each peer is a child process (plus its p2p daemon) driven through a pipe; its
    ``return_future=True`` futures are awaited, as hivemind's own benchmark does."""

    name = "hivemind"

    def __init__(self, args: argparse.Namespace):
        import hivemind
        from hivemind.utils import get_dht_time  # not re-exported as hivemind.get_dht_time in 1.1.x

        self.hivemind = hivemind
        self.get_dht_time = get_dht_time
        self.version = hivemind.__version__
        self.wait_timeout = args.wait_timeout
        self.replicas = args.replicas
        self.calls = "return_future"

    def create(self, initial_peers: list) -> Any:
        return self.hivemind.DHT(initial_peers=list(initial_peers), start=True, wait_timeout=self.wait_timeout,
                                 num_replicas=self.replicas)

    def addresses(self, peer: Any) -> list:
        return list(peer.get_visible_maddrs())

    async def store(self, peer: Any, key: str, value: str, expiration_time: float, subkey: str) -> bool:
        return bool(await peer.store(key, value, expiration_time, subkey=subkey, return_future=True))

    async def get(self, peer: Any, key: str, latest: bool) -> Any:
        return await peer.get(key, latest=latest, return_future=True)

    def shutdown(self, peer: Any) -> None:
        peer.shutdown()  # joins for up to 3 s, then terminates the process

    def close(self) -> None:
        pass


BACKENDS = {"hivesim": HivesimBackend, "hivemind": HivemindBackend}


def make_backend(args: argparse.Namespace) -> Any:
    if args.backend == "hivesim" and args.hivesim_procs > 1:
        return HivesimProcsBackend(args)
    return BACKENDS[args.backend](args)


def subkey_values(result: Any) -> dict | None:
    """``{subkey: value}`` out of ``get``'s answer, ``ValueWithExpiration(value={subkey:
    ValueWithExpiration(value, expiration)}, expiration)`` for both backends; None if absent or not that."""
    if result is None:
        return None
    inner = result.value if hasattr(result, "value") else result[0]
    if not isinstance(inner, dict):
        return None
    return {subkey: (item.value if hasattr(item, "value") else item[0]) for subkey, item in inner.items()}


# ------------------------------------------------------------------------------------------------ workload
async def call_all(calls: list, timeout: float) -> tuple[list, list[float], int]:
    """Await ``calls`` (coroutines) at once; return each result (the exception for a call that raised,
    TimeoutError for one not done within ``timeout``), each call's own latency, and the timeout count."""

    async def timed(call):
        started = time.perf_counter()
        try:
            return await asyncio.wait_for(call, timeout), time.perf_counter() - started, False
        except asyncio.TimeoutError:
            return TimeoutError(f"not done in {timeout} s"), time.perf_counter() - started, True
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this worker is being cancelled (--timeout)
            # the backend's future was cancelled under it: a failed call
            return RuntimeError(f"the call was cancelled: {e!r}"), time.perf_counter() - started, False
        except Exception as e:  # noqa: BLE001 - counted as a failed call
            return e, time.perf_counter() - started, False

    outcomes = await asyncio.gather(*(timed(call) for call in calls))
    return [o[0] for o in outcomes], [o[1] for o in outcomes], sum(o[2] for o in outcomes)


def hex128(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


class Killer:
    """Shuts the set-aside peers down, one each time the global round count hits a drawn number."""

    def __init__(self, backend, victims: list, kill_at: list[int]):
        self.backend, self.victims, self.kill_at = backend, list(victims), sorted(kill_at)
        self.lock = asyncio.Lock()
        self.rounds_done = 0
        self.killed = 0
        self.kill_times: list[float] = []

    async def after_store(self, pool: DaemonPool) -> None:
        async with self.lock:
            due = self.killed < len(self.kill_at) and self.rounds_done == self.kill_at[self.killed]
            self.rounds_done += 1
            if not due:
                return
            victim = self.victims[self.killed]
            self.killed += 1
            started = time.perf_counter()
            try:  # on a thread, so that the other workers go on meanwhile
                await pool.run(self.backend.shutdown, victim)
            except Exception as e:  # noqa: BLE001
                print(f"[bench_dht] shutting a peer down raised {e!r}", file=sys.stderr)
            self.kill_times.append(time.perf_counter() - started)


async def worker(backend, peers: list, killer: Killer, pool: DaemonPool, rng: random.Random, args) -> dict:
    out = {k: [] for k in ("store_round", "get_round", "store_call", "get_call")}
    out.update(stores=0, stores_ok=0, gets=0, gets_ok=0, timeouts=0, errors=[], get_failures={})
    for _ in range(args.rounds):
        # everything random about the round is drawn up front, from this worker's own seeded generator
        key = hex128(rng)
        store_peers = rng.sample(peers, min(args.stores, len(peers)))
        subkeys = [hex128(rng) for _ in store_peers]
        values = {subkey: hex128(rng) for subkey in subkeys}
        get_peers = rng.sample(peers, min(args.gets, len(peers)))

        expiration_time = backend.get_dht_time() + args.expiration
        started = time.perf_counter()
        results, latencies, timeouts = await call_all(
            [backend.store(peer, key, values[subkey], expiration_time, subkey)
             for peer, subkey in zip(store_peers, subkeys)],
            args.op_timeout,
        )
        out["store_round"].append(time.perf_counter() - started)
        out["store_call"].extend(latencies)
        out["timeouts"] += timeouts
        stored = {subkey: values[subkey] for subkey, ok in zip(subkeys, results) if ok is True}
        out["stores"] += len(results)
        out["stores_ok"] += len(stored)
        out["errors"] += [repr(r) for r in results if isinstance(r, BaseException)][:3]
        await killer.after_store(pool)
        if args.delay:
            await asyncio.sleep(args.delay)

        started = time.perf_counter()
        results, latencies, timeouts = await call_all(
            [backend.get(peer, key, args.latest) for peer in get_peers], args.op_timeout
        )
        out["get_round"].append(time.perf_counter() - started)
        out["get_call"].extend(latencies)
        out["timeouts"] += timeouts
        out["gets"] += len(results)
        for result in results:
            if isinstance(result, BaseException):
                out["errors"].append(repr(result))
                why = "raised or timed out"
            elif (found := subkey_values(result)) == stored:
                out["gets_ok"] += 1
                continue
            elif found is None:
                why = "nothing found"
            elif set(found) < set(stored):
                why = "some subkeys missing"
            else:
                why = "other subkeys or values"
            out["get_failures"][why] = out["get_failures"].get(why, 0) + 1
        if args.wait_after_round:
            await asyncio.sleep(args.wait_after_round)
    out["errors"] = out["errors"][:5]
    return out


async def run_rounds(backend, survivors: list, killer: Killer, args) -> tuple[list[dict], float]:
    pool = DaemonPool(1, "dht-kill")
    if hasattr(backend, "open_rounds"):
        await backend.open_rounds()
    try:
        started = time.perf_counter()
        workers = [
            worker(backend, survivors, killer, pool, random.Random(f"{args.seed}/{w}"), args)
            for w in range(args.workers)
        ]
        try:
            parts = await asyncio.wait_for(asyncio.gather(*workers), args.timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the rounds were not done after {args.timeout:.0f} s (--timeout)") from None
        return parts, time.perf_counter() - started
    finally:
        pool.close()
        if hasattr(backend, "close_rounds"):
            await backend.close_rounds()


def shutdown_all(backend, peers: list, timeout: float) -> None:
    """Shut every peer down in parallel, waiting at most ``timeout`` seconds in all."""
    threads = [threading.Thread(target=backend.shutdown, args=(p,), daemon=True) for p in peers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        print(f"[bench_dht] {stuck} peer(s) still shutting down after {timeout:.0f} s", file=sys.stderr)


def summary(values: list[float]) -> dict:
    if not values:
        return dict(mean=float("nan"), std=float("nan"), max=float("nan"), p50=float("nan"))
    return dict(
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        max=max(values),
        p50=statistics.median(values),
    )


def run_workload(backend, args) -> dict:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    rng = random.Random(args.seed)
    log = lambda msg: print(f"[bench_dht:{backend.name}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    peers: list = []
    try:
        log(f"creating {args.peers} peers ...")
        started = time.perf_counter()
        for _ in range(args.peers):
            neighbours = rng.sample(peers, min(args.initial_peers, len(peers)))
            initial = [address for peer in neighbours for address in backend.addresses(peer)]
            peers.append(backend.create(initial))
        create_s = time.perf_counter() - started
        log(f"created in {create_s:.2f} s; running {args.workers} workers x {args.rounds} rounds ...")

        n_victims = min(int(args.failure_rate * args.peers), args.peers)
        if n_victims >= args.peers:
            raise SystemExit("--failure-rate would kill every peer")
        victims = rng.sample(peers, n_victims)
        survivors = [peer for peer in peers if not any(peer is v for v in victims)]
        total_rounds = args.workers * args.rounds
        killer = Killer(backend, victims, rng.sample(range(total_rounds), min(n_victims, total_rounds)))

        parts, total_s = asyncio.run(run_rounds(backend, survivors, killer, args))
    finally:
        if peers:
            log(f"shutting {len(peers)} peers down ...")
            shutdown_all(backend, peers, args.shutdown_timeout)
        backend.close()

    merged = {k: [x for part in parts for x in part[k]] for k in ("store_round", "get_round", "store_call", "get_call")}
    count = {k: sum(part[k] for part in parts) for k in ("stores", "stores_ok", "gets", "gets_ok", "timeouts")}
    store, get = summary(merged["store_round"]), summary(merged["get_round"])
    return {
        "load": load,
        "backend": backend.name,
        "version": backend.version,
        "calls": backend.calls,
        "params": {k: getattr(args, k) for k in WORKLOAD_PARAMS},
        "create_peers_s": create_s,
        "store_mean_s": store["mean"], "store_std_s": store["std"], "store_p50_s": store["p50"], "store_max_s": store["max"],
        "get_mean_s": get["mean"], "get_std_s": get["std"], "get_p50_s": get["p50"], "get_max_s": get["max"],
        "store_per_worker_s": sum(merged["store_round"]) / args.workers,
        "get_per_worker_s": sum(merged["get_round"]) / args.workers,
        "store_call_mean_s": summary(merged["store_call"])["mean"],
        "get_call_mean_s": summary(merged["get_call"])["mean"],
        "total_s": total_s,
        "store_success": count["stores_ok"] / max(1, count["stores"]),
        "get_success": count["gets_ok"] / max(1, count["gets"]),
        **count,
        "killed": killer.killed,
        "kill_mean_s": statistics.fmean(killer.kill_times) if killer.kill_times else 0.0,
        "get_failures": {why: sum(part["get_failures"].get(why, 0) for part in parts)
                         for why in sorted({why for part in parts for why in part["get_failures"]})},
        "errors": [e for part in parts for e in part["errors"]][:5],
    }


# ---------------------------------------------------------------------------------------------- reporting
ROWS = [  # (label, key, is a time to compare)
    ("create peers (s)", "create_peers_s", True),
    ("store mean (s)", "store_mean_s", True),
    ("store p50 (s)", "store_p50_s", True),
    ("store max (s)", "store_max_s", True),
    ("get mean (s)", "get_mean_s", True),
    ("get p50 (s)", "get_p50_s", True),
    ("get max (s)", "get_max_s", True),
    ("store call mean (s)", "store_call_mean_s", True),
    ("get call mean (s)", "get_call_mean_s", True),
    ("store per worker (s)", "store_per_worker_s", True),
    ("get per worker (s)", "get_per_worker_s", True),
    ("total (s)", "total_s", True),
    ("store success", "store_success", False),
    ("get success", "get_success", False),
    ("op timeouts", "timeouts", False),
    ("peers killed", "killed", False),
    ("kill mean (s)", "kill_mean_s", False),
]


def fmt(key: str, value: Any) -> str:
    if key.endswith("_success"):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.2f}"
    return str(value)


def print_one(result: dict) -> None:
    p = result["params"]
    print(f"DHT benchmark: {result['backend']} {result['version']} ({result['calls']} calls): {p['peers']} peers, {p['workers']} workers x "
          f"{p['rounds']} rounds, {p['stores']} stores + {p['gets']} gets a round, {p['replicas']} replicas, "
          f"failure rate {p['failure_rate']}, seed {p['seed']}")
    for label, key, _ in ROWS:
        print(f"  {label:<22} {fmt(key, result[key]):>12}")
    print(f"  stores {result['stores_ok']}/{result['stores']}, gets {result['gets_ok']}/{result['gets']}")
    for why, n in result["get_failures"].items():
        print(f"  failed gets, {why}: {n}")
    for error in result["errors"]:
        print(f"  error: {error}")


def print_both(ours: dict, theirs: dict) -> None:
    p = ours["params"]
    print(f"DHT benchmark, same workload and seed: {p['peers']} peers, {p['workers']} workers x {p['rounds']} rounds, "
          f"{p['stores']} stores + {p['gets']} gets a round, {p['replicas']} replicas, failure rate {p['failure_rate']}, "
          f"seed {p['seed']}")
    print(f"  hivesim peers: {ours['calls']}; hivemind peers: a process and a p2p daemon each "
          f"({os.cpu_count()} cores, load before the run {ours.get('load', '?')})")
    print(f"  {'':<22} {'hivesim ' + str(ours['version']):>16} {'hivemind ' + str(theirs['version']):>16} "
          f"{'hivemind/hivesim':>18}")
    for label, key, is_time in ROWS:
        ratio = ""
        if is_time and ours[key] > 0:
            r = theirs[key] / ours[key]
            ratio = f"{r:.1f}x" + ("" if r >= GOAL_RATIO else f"  (< {GOAL_RATIO:.0f}x)")
        print(f"  {label:<22} {fmt(key, ours[key]):>16} {fmt(key, theirs[key]):>16} {ratio:>18}")
    for name, result in (("hivesim", ours), ("hivemind", theirs)):
        for why, n in result.get("get_failures", {}).items():
            print(f"  {name} failed gets, {why}: {n}")
        for error in result["errors"]:
            print(f"  {name} error: {error}")


# ----------------------------------------------------------------------------------------------- against
def run_hivemind_subprocess(args: argparse.Namespace) -> dict | None:
    """hivemind's side in its own venv (--hivemind-python or HIVEMIND_PYTHON); None, and how to set one up, without one."""
    python = args.hivemind_python or os.environ.get("HIVEMIND_PYTHON")
    if not python:
        print("[bench_dht] hivemind's side skipped: --against hivemind needs a Python with hivemind installed, in its "
              "own venv (not hivesim's), given by --hivemind-python PATH or the HIVEMIND_PYTHON environment variable. "
              f"Set one up with:\n    {HIVEMIND_SETUP}\nthen pass --hivemind-python hivemind-venv/bin/python",
              file=sys.stderr, flush=True)
        return None
    if not os.path.exists(python):
        raise SystemExit(f"--hivemind-python {python}: no such file")
    command = [python, os.path.abspath(__file__), "--backend", "hivemind", "--json"]
    for name in WORKLOAD_PARAMS + RUN_PARAMS:
        value = getattr(args, name)
        if isinstance(value, bool):
            command.append(f"--{name.replace('_', '-')}" if value else f"--no-{name.replace('_', '-')}")
        else:
            command += [f"--{name.replace('_', '-')}", str(value)]
    print(f"[bench_dht] running hivemind: {' '.join(command)}", file=sys.stderr, flush=True)
    # its own session, so that on a timeout the whole group (DHT processes, p2p daemons) is killed
    try:
        returncode, stdout, _ = run_group(command, args.subprocess_timeout, capture_stderr=False)
    except SubprocessTimeout:
        raise SystemExit(f"hivemind run did not finish within {args.subprocess_timeout:.0f} s (--subprocess-timeout)")
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise SystemExit(f"hivemind run exited {returncode} without a JSON result; its stdout:\n{stdout[-2000:]}")


# ------------------------------------------------------------------------------------------------------ cli
WORKLOAD_PARAMS = ["peers", "initial_peers", "workers", "rounds", "stores", "gets", "failure_rate", "expiration",
                   "delay", "wait_after_round", "latest", "replicas", "seed"]
RUN_PARAMS = ["wait_timeout", "op_timeout", "timeout", "shutdown_timeout"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="hivesim")
    parser.add_argument("--against", choices=["hivemind"], help="also run the same workload on hivemind (subprocess)")
    parser.add_argument("--hivemind-python", default=None,
                        help="Python that has hivemind installed (default: the HIVEMIND_PYTHON environment variable)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.add_argument("--hivesim-procs", type=int, default=os.cpu_count() or 1,
                        help="spread hivesim's peers over this many child processes (default: one per core, as "
                             "hivemind's process per peer uses every core; 1: all peers in this process)")
    parser.add_argument("--hivesim-child", action="store_true", help=argparse.SUPPRESS)
    w = parser.add_argument_group("workload (defaults: hivemind's benchmarks/benchmark_dht.py)")
    w.add_argument("--peers", type=int, default=16)
    w.add_argument("--initial-peers", type=int, default=4, help="earlier peers each new peer bootstraps from")
    w.add_argument("--workers", type=int, default=10, help="concurrent workers")
    w.add_argument("--rounds", type=int, default=16, help="rounds per worker")
    w.add_argument("--stores", type=int, default=8, help="peers storing a subkey each round")
    w.add_argument("--gets", type=int, default=8, help="peers getting the key each round")
    w.add_argument("--failure-rate", type=float, default=0.1, help="fraction of peers killed during the run")
    w.add_argument("--expiration", type=float, default=300.0, help="seconds each stored value lives")
    w.add_argument("--delay", type=float, default=0.0, help="sleep between a round's stores and its gets")
    w.add_argument("--wait-after-round", type=float, default=0.0, help="sleep after each round")
    w.add_argument("--latest", action=argparse.BooleanOptionalAction, default=True, help="get(key, latest=...)")
    w.add_argument("--replicas", type=int, default=5,
                   help="nodes each value is stored on, for both DHTs (default 5: hivemind's default; hivesim's is 8)")
    w.add_argument("--seed", type=int, default=30)
    r = parser.add_argument_group("bounds")
    r.add_argument("--wait-timeout", type=float, default=5.0, help="hivemind DHT(wait_timeout=...): its RPC timeout")
    r.add_argument("--op-timeout", type=float, default=60.0, help="a store or get not done by then counts as failed")
    r.add_argument("--timeout", type=float, default=900.0, help="limit on the rounds of one run, in seconds")
    r.add_argument("--shutdown-timeout", type=float, default=60.0, help="limit on shutting all peers down")
    r.add_argument("--subprocess-timeout", type=float, default=1500.0, help="limit on the hivemind subprocess")
    args = parser.parse_args(argv)
    if args.against and args.backend != "hivesim":
        parser.error("--against hivemind compares with the hivesim backend: leave --backend at hivesim")
    return args


def raise_file_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_file_limit()
    if args.hivesim_child:
        hivesim_child()
        return 0
    result = run_workload(make_backend(args), args)
    theirs = run_hivemind_subprocess(args) if args.against else None
    if theirs is not None:
        if theirs["params"] != result["params"]:
            print(f"[bench_dht] warning: parameters differ: {result['params']} vs {theirs['params']}", file=sys.stderr)
        if args.json:
            print(json.dumps({"hivesim": result, "hivemind": theirs}))
        else:
            print_both(result, theirs)
    elif args.json:
        print(json.dumps(result))
    else:
        print_one(result)
    ok = result["store_success"] > 0 and result["get_success"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
