"""A large DHT swarm on one machine: many DHT peers packed into a few plain processes (no Ray).

    python benchmarks/dht_swarm_scale.py [--peers 1024 --procs 8 --keys 256 --lookups 2000 --pool-size 16]
        [--json] [--out results.json]

Each worker process runs ``peers / procs`` :class:`~hivesim.dht.DHTNode` objects in one asyncio loop, each
with its own ROUTER socket and TCP port, talking to every other peer over real loopback TCP, exactly as
separate hosts would. The parent drives them through pipes (JSON lines):

1. **bootstrap**: one seed peer, then waves in which every worker starts a growing batch of peers, each
   joining through 3 random peers already up (the wave size doubles up to ``--max-wave`` per worker);
2. **stores**: ``--keys`` keys, each stored by a random peer (replicated to the ``num_replicas`` nearest);
3. **lookups**: ``--lookups`` gets of random stored keys from random peers (``--latest-share`` of them
   with ``latest=True``), timed one by one, with their depth in hops and the requests they needed;
4. **memory**: each worker's resident set (RSS) and proportional set (PSS: shared pages split between
   the processes that map them), open file descriptors, sockets, and whether torch was loaded.

Printed: peers up, bootstrap time, store and lookup success, lookup latency percentiles, hops, total
RSS/PSS over the workers and MiB per peer. A DHT-only process does not import torch (see
``hivesim.net.serialization``), so a peer costs sockets, routing table and asyncio objects only.

Limits that matter at this scale: each worker's open-file limit (every socket and TCP connection is a
file descriptor: ``hivesim.net.limits`` raises the soft limit to the hard one) and ZeroMQ's sockets per
context (raised there too). An outgoing connection costs a DEALER socket, its monitor pair and a TCP
connection, so ``--pool-size`` (outgoing connections a peer keeps open, LRU) bounds both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

# --------------------------------------------------------------------------------------------- worker side


def _memory() -> dict[str, float]:
    """This process's RSS and PSS in MiB (PSS splits shared pages between the processes mapping them)."""
    out = {"rss_mib": 0.0, "pss_mib": 0.0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        out["pss_mib"] = out["rss_mib"]
    return out


async def _worker(args: argparse.Namespace) -> None:
    from hivesim.dht import DHTNode

    rng = random.Random(f"{args.seed}/worker/{args.worker_index}")
    nodes: list[DHTNode] = []
    loop = asyncio.get_running_loop()

    async def make(initial: list[str]) -> DHTNode:
        return await DHTNode.create(
            initial, num_replicas=args.replicas, rpc_timeout=args.rpc_timeout, seed=rng.getrandbits(32),
            endpoint_options={"pool_size": args.pool_size},
        )

    async def bounded(calls: list, limit: int) -> list:
        gate = asyncio.Semaphore(limit)

        async def run(call):
            async with gate:
                return await call

        return await asyncio.gather(*(run(c) for c in calls), return_exceptions=True)

    async def timed(coro) -> tuple[Any, float]:
        started = time.perf_counter()
        result = await coro
        return result, time.perf_counter() - started

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "start":
            started = time.perf_counter()
            initial = cmd["initial"]
            made = await bounded(
                [make(rng.sample(initial, min(3, len(initial)))) for _ in range(cmd["count"])], args.concurrency
            )
            failed = [repr(m) for m in made if isinstance(m, BaseException)]
            fresh = [m for m in made if not isinstance(m, BaseException)]
            nodes.extend(fresh)
            reply({"addresses": [n.address for n in fresh], "failed": failed[:3], "n_failed": len(failed),
                   "seconds": time.perf_counter() - started})
        elif op == "store":
            from hivesim.dht import get_dht_time

            expiration = get_dht_time() + cmd["ttl"]
            results = await bounded(
                [timed(nodes[i % len(nodes)].store(key, value, expiration)) for i, key, value in cmd["items"]],
                args.concurrency,
            )
            reply({"ok": [not isinstance(r, BaseException) and bool(r[0]) for r in results],
                   "seconds": [r[1] if not isinstance(r, BaseException) else None for r in results]})
        elif op == "lookup":
            results = await bounded(
                [timed(nodes[i % len(nodes)].lookup(key, latest=latest)) for i, key, _, latest in cmd["items"]],
                args.concurrency,
            )
            out = []
            for (_, _, expected, _), result in zip(cmd["items"], results):
                if isinstance(result, BaseException):
                    out.append([False, None, None, None])
                    continue
                (value, stats), seconds = result
                ok = value is not None and value.value == expected
                out.append([ok, seconds, stats.hops, stats.requests])
            reply({"results": out})
        elif op == "stats":
            tables = [len(n.routing) for n in nodes]
            reply({
                **_memory(),
                "nodes": len(nodes),
                "fds": len(os.listdir("/proc/self/fd")),
                "connections": sum(len(n.endpoint.pool) for n in nodes),
                "routing_mean": statistics.fmean(tables) if tables else 0.0,
                "torch_loaded": "torch" in sys.modules,
            })
        elif op == "exit":
            await asyncio.gather(*(n.shutdown() for n in nodes), return_exceptions=True)
            reply({"bye": True})
            return


# --------------------------------------------------------------------------------------------- parent side


class Worker:
    """One worker process, driven by JSON lines over its stdin/stdout."""

    def __init__(self, index: int, args: argparse.Namespace) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--worker-index", str(index)]
        for name in ("seed", "pool_size", "replicas", "rpc_timeout", "concurrency"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.index = index

    async def ask(self, cmd: dict | None, timeout: float) -> dict:
        if cmd is not None:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line:
            raise RuntimeError(f"worker {self.index} exited (code {self.proc.poll()})")
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    workers = [Worker(i, args) for i in range(args.procs)]
    try:
        await asyncio.gather(*(w.ask(None, 120) for w in workers))  # each says it is ready
        log = lambda msg: print(f"[dht_swarm_scale] {msg}", file=sys.stderr, flush=True)  # noqa: E731

        # ---------------------------------------------------------------- bootstrap
        per_worker = [args.peers // args.procs + (i < args.peers % args.procs) for i in range(args.procs)]
        started = time.perf_counter()
        first = await workers[0].ask({"op": "start", "count": 1, "initial": []}, 120)
        up: list[str] = first["addresses"]
        left = per_worker[:]
        left[0] -= 1
        wave, failed = 1, 0
        while any(left):
            counts = [min(wave, n) for n in left]
            answers = await asyncio.gather(*(
                w.ask({"op": "start", "count": c, "initial": up}, args.step_timeout)
                for w, c in zip(workers, counts) if c
            ))
            for i, c in enumerate(counts):
                left[i] -= c
            for answer in answers:
                up += answer["addresses"]
                failed += answer["n_failed"]
                for error in answer["failed"]:
                    log(f"a peer failed to join: {error}")
            log(f"{len(up)}/{args.peers} peers up after {time.perf_counter() - started:.1f} s")
            wave = min(wave * 2, args.max_wave)
        bootstrap_s = time.perf_counter() - started

        stats_after_join = await asyncio.gather(*(w.ask({"op": "stats"}, 60) for w in workers))
        sizes = [s["nodes"] for s in stats_after_join]

        def random_peer() -> tuple[int, int]:
            w = rng.choices(range(len(workers)), weights=sizes)[0]
            return w, rng.randrange(sizes[w])

        # ---------------------------------------------------------------- stores
        keys = [f"swarm-key-{i}" for i in range(args.keys)]
        values = {key: f"value-{rng.getrandbits(64):016x}" for key in keys}
        by_worker: dict[int, list] = {i: [] for i in range(len(workers))}
        for key in keys:
            w, i = random_peer()
            by_worker[w].append([i, key, values[key]])
        started = time.perf_counter()
        answers = await asyncio.gather(*(
            workers[w].ask({"op": "store", "items": items, "ttl": 3600}, args.step_timeout)
            for w, items in by_worker.items() if items
        ))
        store_s = time.perf_counter() - started
        store_ok = [ok for a in answers for ok in a["ok"]]
        store_times = [t for a in answers for t in a["seconds"] if t is not None]

        # ---------------------------------------------------------------- lookups
        by_worker = {i: [] for i in range(len(workers))}
        for _ in range(args.lookups):
            w, i = random_peer()
            key = rng.choice(keys)
            by_worker[w].append([i, key, values[key], rng.random() < args.latest_share])
        started = time.perf_counter()
        answers = await asyncio.gather(*(
            workers[w].ask({"op": "lookup", "items": items}, args.step_timeout)
            for w, items in by_worker.items() if items
        ))
        lookup_s = time.perf_counter() - started
        results = [r for a in answers for r in a["results"]]
        ok = [r for r in results if r[0]]
        latencies = [r[1] for r in ok]
        hops = [r[2] for r in ok]
        requests = [r[3] for r in ok]

        final = await asyncio.gather(*(w.ask({"op": "stats"}, 60) for w in workers))
        for w in workers:
            try:
                await w.ask({"op": "exit"}, 60)
            except Exception:  # noqa: BLE001 - killed below anyway
                pass
        return {
            "peers_requested": args.peers,
            "peers_up": sum(s["nodes"] for s in final),
            "peers_failed_to_join": failed,
            "processes": args.procs,
            "pool_size": args.pool_size,
            "bootstrap_s": bootstrap_s,
            "stores": len(store_ok),
            "store_success": sum(store_ok) / max(1, len(store_ok)),
            "store_p50_ms": 1e3 * percentile(store_times, 0.5),
            "store_wall_s": store_s,
            "lookups": len(results),
            "lookup_success": len(ok) / max(1, len(results)),
            "lookup_p50_ms": 1e3 * percentile(latencies, 0.5),
            "lookup_p90_ms": 1e3 * percentile(latencies, 0.9),
            "lookup_p99_ms": 1e3 * percentile(latencies, 0.99),
            "lookups_per_s": len(results) / lookup_s if lookup_s else float("nan"),
            "hops_mean": statistics.fmean(hops) if hops else float("nan"),
            "hops_max": max(hops) if hops else None,
            "requests_mean": statistics.fmean(requests) if requests else float("nan"),
            "rss_total_mib": sum(s["rss_mib"] for s in final),
            "pss_total_mib": sum(s["pss_mib"] for s in final),
            "rss_per_process_mib": [round(s["rss_mib"], 1) for s in final],
            "mib_per_peer_rss": sum(s["rss_mib"] for s in final) / max(1, sum(s["nodes"] for s in final)),
            "mib_per_peer_pss": sum(s["pss_mib"] for s in final) / max(1, sum(s["nodes"] for s in final)),
            "fds_per_process_max": max(s["fds"] for s in final),
            "open_connections": sum(s["connections"] for s in final),
            "routing_table_mean": statistics.fmean(s["routing_mean"] for s in final),
            "torch_loaded": any(s["torch_loaded"] for s in final),
        }
    finally:
        for w in workers:
            w.kill()


def print_report(r: dict) -> None:
    print(f"DHT swarm: {r['peers_up']}/{r['peers_requested']} peers up in {r['processes']} processes "
          f"(outgoing pool {r['pool_size']} per peer), bootstrap {r['bootstrap_s']:.1f} s"
          + (f", {r['peers_failed_to_join']} failed to join" if r["peers_failed_to_join"] else ""))
    print(f"  stores   {r['stores']:>6}  success {100 * r['store_success']:.1f}%   p50 {r['store_p50_ms']:.1f} ms")
    print(f"  lookups  {r['lookups']:>6}  success {100 * r['lookup_success']:.1f}%   latency p50 {r['lookup_p50_ms']:.1f} ms, "
          f"p90 {r['lookup_p90_ms']:.1f} ms, p99 {r['lookup_p99_ms']:.1f} ms  ({r['lookups_per_s']:.0f}/s)")
    print(f"  hops     mean {r['hops_mean']:.2f}, max {r['hops_max']};  find requests per lookup {r['requests_mean']:.1f};  "
          f"routing table {r['routing_table_mean']:.0f} contacts")
    print(f"  memory   RSS {r['rss_total_mib']:.0f} MiB in all ({r['mib_per_peer_rss']:.2f} MiB per peer), "
          f"PSS {r['pss_total_mib']:.0f} MiB ({r['mib_per_peer_pss']:.2f} MiB per peer); per process RSS "
          f"{r['rss_per_process_mib']}")
    print(f"  limits   {r['fds_per_process_max']} file descriptors in the busiest process, "
          f"{r['open_connections']} outgoing connections open; torch loaded: {r['torch_loaded']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1024)
    parser.add_argument("--procs", type=int, default=8, help="worker processes the peers are packed into")
    parser.add_argument("--keys", type=int, default=256, help="keys stored, each by a random peer")
    parser.add_argument("--lookups", type=int, default=2000, help="gets of random keys from random peers")
    parser.add_argument("--latest-share", type=float, default=0.1, help="share of the gets made with latest=True")
    parser.add_argument("--pool-size", type=int, default=16, help="outgoing connections each peer keeps open")
    parser.add_argument("--replicas", type=int, default=8, help="DHTNode num_replicas")
    parser.add_argument("--rpc-timeout", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=8, help="operations in flight per worker")
    parser.add_argument("--max-wave", type=int, default=32, help="most peers a worker starts per bootstrap wave")
    parser.add_argument("--step-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the report")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_index is None and not 1 <= args.procs <= args.peers:
        parser.error("--procs must be between 1 and --peers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_index is not None:
        asyncio.run(_worker(args))
        return 0
    result = asyncio.run(drive(args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    return 0 if result["lookup_success"] > 0.99 and result["peers_up"] == args.peers else 1


if __name__ == "__main__":
    sys.exit(main())
