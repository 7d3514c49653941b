"""Decentralized averaging speed: hivesim's DecentralizedAverager, or hivemind's, on the same workload.

    python benchmarks/bench_averaging.py [--peers 16 --group 4 --rounds 5 ...] [--allreduce-floats 100e6] [--json]
    python benchmarks/bench_averaging.py --against hivemind [--hivemind-python PATH]   # or HIVEMIND_PYTHON=PATH
    python benchmarks/bench_averaging.py --only-allreduce      # workload 2 alone
    python benchmarks/bench_averaging.py --aggregation centered_clip   # a Byzantine-robust rule's cost

Workload 1 is the one of hivemind's ``benchmarks/benchmark_averaging.py`` (same defaults): ``--peers``
threads are started ``--spawn-dtime`` apart, each with its own DHT peer (bootstrapped from one root peer)
and a ``DecentralizedAverager`` over the tensors of a 3-layer MLP of hidden size 256 (2,373,888 floats;
same shapes as hivemind's ``sample_tensors``), group bits ``index % groups`` (``groups = peers / group``
rounded to a power of two), float16 compression; each runs ``--rounds`` steps with a
``--round-timeout``. Reported: wall time from the last spawn until every thread finished (as hivemind's
benchmark measures it) and the share of steps that returned a group; of the steps that did not, how many
were the last step of the last peer still stepping, ended after every other peer had finished (peers run
a fixed number of steps and drift apart, so the last one may have had nobody left to group with).

Workload 2 (hivesim only unless ``--hivemind-allreduce``): ``--allreduce-repeats`` all-reduces (default 3,
in one swarm: a training job averages again and again; the median is reported, every one printed) of
``--allreduce-floats`` float32 numbers among 4 peers, no compression, checked for the exact mean. Printed beside it: the bytes
all peers sent, the raw throughput of one loopback stream through the same RPC layer in this process,
and the time that traffic needs at that throughput (the loopback limit).

``--against hivemind`` runs hivesim here, then the same workload and parameters with hivemind in a
subprocess of a Python that has it (hivemind's averager calls ``signal.signal`` from threads, which only
the main thread may do: the hivemind side replaces it by a no-op outside the main thread), and prints
both with the ratio hivemind / hivesim.

This file imports neither library at module level: each backend imports its own when it is chosen.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from typing import Any

from subprocess_group import SubprocessTimeout, run_group

HIVEMIND_SETUP = ("python3 -m venv hivemind-venv && hivemind-venv/bin/pip install torch==2.13.0 && "
                  "hivemind-venv/bin/pip install hivemind==1.1.12 torch==2.13.0")
GOAL_SPEEDUP = 5.0
GOAL_LOOPBACK = 2.0


def mlp_tensors(hidden: int, layers: int, seed: int) -> list:
    """The tensors of hivemind's averaging benchmark: per layer a 3h x h block with its biases, an h x h
    block with a layer norm, a 4h x h block with biases and scales, a (2, h, h, 2) block and three h-vectors."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h = hidden
    shapes = [(h, 3 * h), (3 * h,), (3 * h,), (h, h), (h,), (h,), (h, 4 * h), (4 * h,), (4 * h,), (2, h, h, 2), (h,), (h,), (h,)]
    return [torch.randn(*shape, generator=gen) for _ in range(layers) for shape in shapes]


def group_bits(index: int, peers: int, group: int) -> str:
    groups = 2 ** int(round(math.log2(max(1, peers / group))))
    width = int(round(math.log2(groups)))
    return format(index % groups, f"0{width}b") if width else ""


def uptime() -> str:
    try:
        return open("/proc/loadavg").read().split(" ", 3)[:3].__repr__()
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------------------ workload 1
def run_threads(args: argparse.Namespace, make_peer: Any, step: Any, close: Any) -> dict[str, Any]:
    """hivemind's benchmark loop, library-neutral: ``make_peer(index) -> handle``, ``step(handle) -> bool``."""
    lock = threading.Lock()
    counts = {"ok": 0, "total": 0}
    handles: list[Any] = []
    errors: list[str] = []
    finished = [math.inf] * args.peers  # when each thread ended its last step
    failed_last: list[tuple[int, float]] = []  # (thread, end) of each last step that found no group

    def run(index: int) -> None:
        try:
            handle = make_peer(index)
        except Exception as e:  # a peer that cannot start counts as failing all its steps
            with lock:
                counts["total"] += args.rounds
                errors.append(repr(e))
            return
        with lock:
            handles.append(handle)
        for r in range(args.rounds):
            try:
                ok = bool(step(handle))
            except Exception as e:
                ok = False
                with lock:
                    errors.append(repr(e))
            with lock:
                counts["ok"] += ok
                counts["total"] += 1
                if r == args.rounds - 1:
                    finished[index] = time.perf_counter()
                    if not ok:
                        failed_last.append((index, finished[index]))

    threads = []
    for i in range(args.peers):
        thread = threading.Thread(target=run, args=(i,), daemon=True)
        thread.start()
        threads.append(thread)
        time.sleep(args.spawn_dtime)
    t0 = time.perf_counter()
    for thread in threads:
        thread.join(args.rounds * (args.round_timeout + 30) + 60)
    elapsed = time.perf_counter() - t0
    hung = sum(t.is_alive() for t in threads)
    for handle in handles:
        try:
            close(handle)
        except Exception:
            pass
    # the last step of the last thread still stepping, which ended after every other thread had finished: it
    # may have had nobody left to group with
    last_alone = sum(all(t <= ended for j, t in enumerate(finished) if j != i) for i, ended in failed_last)
    return {"seconds": round(elapsed, 3), "ok": counts["ok"], "total": counts["total"], "hung_threads": hung,
            "success_rate": round(counts["ok"] / max(1, counts["total"]), 4), "last_alone": last_alone,
            "errors": errors[:5]}


def run_averagers(args: argparse.Namespace, make_peer: Any, root: Any, tensors: list) -> dict[str, Any]:
    """Run the averaging rounds on ``(dht, averager)`` pairs from ``make_peer`` (either library's), then
    shut everything down: the part both workloads share."""

    def close(handle: Any) -> None:
        handle[1].shutdown()
        handle[0].shutdown()

    try:
        out = run_threads(args, make_peer, lambda h: h[1].step(timeout=args.round_timeout) is not None, close)
    finally:
        root.shutdown()
    out["floats_per_peer"] = sum(t.numel() for t in tensors[0])
    return out


def hivesim_workload(args: argparse.Namespace) -> dict[str, Any]:
    from hivesim import DHT
    from hivesim.averaging import DecentralizedAverager

    root = DHT()
    initial = root.get_visible_addresses()
    tensors = [mlp_tensors(args.hidden, args.layers, i) for i in range(args.peers)]

    def make_peer(i: int) -> Any:
        dht = DHT(initial_peers=initial)
        averager = DecentralizedAverager(tensors[i], dht, prefix="my_tensor", initial_group_bits=group_bits(i, args.peers, args.group),
                                         compression="float16", target_group_size=args.group, request_timeout=args.request_timeout,
                                         aggregation=args.aggregation)
        return dht, averager

    return run_averagers(args, make_peer, root, tensors)


def hivemind_workload(args: argparse.Namespace) -> dict[str, Any]:
    _patch_signal()
    import hivemind
    from hivemind.compression import Float16Compression

    root = hivemind.DHT(start=True)
    initial = root.get_visible_maddrs()
    tensors = [mlp_tensors(args.hidden, args.layers, i) for i in range(args.peers)]

    def make_peer(i: int) -> Any:
        dht = hivemind.DHT(initial_peers=initial, start=True)
        averager = hivemind.averaging.DecentralizedAverager(
            tensors[i], dht, prefix="my_tensor", initial_group_bits=group_bits(i, args.peers, args.group),
            compression=Float16Compression(), target_group_size=args.group,
            min_matchmaking_time=args.min_matchmaking_time, request_timeout=args.request_timeout, start=True)
        return dht, averager

    return run_averagers(args, make_peer, root, tensors)


def _patch_signal() -> None:
    """hivemind sets SIGINT handlers when its DHT/averager start; only the main thread may. Elsewhere: no-op."""
    import signal

    original = signal.signal

    def patched(signum: int, handler: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            return original(signum, handler)
        return signal.getsignal(signum)

    signal.signal = patched


# ------------------------------------------------------------------------------------------------ workload 2
def hivesim_big_allreduce(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import torch

    from hivesim.averaging import AveragerCore
    from hivesim.dht import DHTNode
    from hivesim.net import Endpoint
    from hivesim.net.rpc import measure_loopback

    n = int(args.allreduce_floats)

    async def main() -> dict[str, Any]:
        # best of two: the first measurement in a fresh process runs slower (cold allocator and sockets),
        # which would flatter the ratio of a run without workload 1 before it
        rate = max([await measure_loopback(min(256 << 20, 4 * n), timeout=600) for _ in range(2)])
        nodes = [await DHTNode.create()]
        for _ in range(3):
            nodes.append(await DHTNode.create([nodes[0].address]))
        steps: list[dict[str, Any]] = []
        try:
            cores = [await AveragerCore(node.endpoint, node, [torch.full((n,), float(i))], prefix="big", target_group_size=4,
                                        matchmaking_time=30.0, allreduce_timeout=600.0, aggregation=args.aggregation).start()
                     for i, node in enumerate(nodes)]
            for _ in range(args.allreduce_repeats):  # the mean of 0..3 is 1.5 whatever the number of rounds
                sent0 = sum(node.endpoint.stats["bytes_sent"] for node in nodes)
                t0 = time.perf_counter()
                results = await asyncio.gather(*(c.step() for c in cores))
                total = time.perf_counter() - t0
                sent = sum(node.endpoint.stats["bytes_sent"] for node in nodes) - sent0
                allreduce_s = max(r.allreduce_s for r in results if r is not None) if all(results) else None
                steps.append({"ok": all(results), "step_s": round(total, 3), "bytes_sent": sent,
                              "allreduce_s": None if allreduce_s is None else round(allreduce_s, 3),
                              "ratio_to_limit": None if allreduce_s is None else round(allreduce_s * rate / sent, 2)})
            # the mean of 0..3 is exactly 1.5; a robust rule agrees only approximately (and that is its point)
            exact = all(bool((c.tensors[0] == 1.5).all()) for c in cores) if args.aggregation == "mean" else None
        finally:
            for node in nodes:
                await node.shutdown()
        middle = sorted(steps, key=lambda s: math.inf if s["allreduce_s"] is None else s["allreduce_s"])[len(steps) // 2]
        return {"floats": n, "peers": 4, "ok": all(s["ok"] for s in steps), "exact_mean": exact, **middle,
                "loopback_Bps": round(rate), "loopback_limit_s": round(middle["bytes_sent"] / rate, 3),
                "repeats": [s["ratio_to_limit"] for s in steps]}

    return asyncio.run(main())


def hivemind_big_allreduce(args: argparse.Namespace) -> dict[str, Any]:
    _patch_signal()
    import hivemind
    import torch

    n = int(args.allreduce_floats)
    root = hivemind.DHT(start=True)
    dhts = [root] + [hivemind.DHT(initial_peers=root.get_visible_maddrs(), start=True) for _ in range(3)]
    averagers = [hivemind.averaging.DecentralizedAverager([torch.full((n,), float(i))], dht, prefix="big", target_group_size=4,
                                                         min_matchmaking_time=5.0, request_timeout=3.0, start=True)
                 for i, dht in enumerate(dhts)]
    try:
        t0 = time.perf_counter()
        futures = [a.step(wait=False, timeout=600) for a in averagers]
        results = [f.result() for f in futures]
        total = time.perf_counter() - t0
        with averagers[0].get_tensors() as (tensor,):
            exact = bool((tensor == 1.5).all())
    finally:
        for a in averagers:
            a.shutdown()
        for dht in dhts:
            dht.shutdown()
    return {"floats": n, "peers": 4, "ok": all(r is not None for r in results), "exact_mean": exact, "step_s": round(total, 3)}


# ------------------------------------------------------------------------------------------------ driver
def run_backend(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": args.backend, "load": uptime(), "workload": {}}
    if args.backend == "hivesim":
        out["workload"] = {} if args.only_allreduce else hivesim_workload(args)
        if args.allreduce_floats > 0:
            out["allreduce"] = hivesim_big_allreduce(args)
    else:
        out["workload"] = {} if args.only_allreduce else hivemind_workload(args)
        if args.allreduce_floats > 0 and args.hivemind_allreduce:
            out["allreduce"] = hivemind_big_allreduce(args)
    return out


def show(result: dict[str, Any], args: argparse.Namespace) -> None:
    w = result["workload"]
    if w:
        print(f"[{result['backend']}] {args.peers} peers, groups of {args.group}, {args.rounds} rounds, "
              f"{w['floats_per_peer']:,} floats/peer, float16: {w['seconds']:.2f} s, "
              f"{w['ok']}/{w['total']} steps found a group ({100 * w['success_rate']:.1f}%)"
              + (f"; {w['total'] - w['ok']} did not, {w.get('last_alone', 0)} of them the last step of the last peer"
                 f" still stepping (every other peer had finished)" if w["ok"] < w["total"] else "")
              + (f", {w['hung_threads']} threads hung" if w["hung_threads"] else ""))
    big = result.get("allreduce")
    if big:
        line = f"[{result['backend']}] all-reduce of {big['floats']:,} float32 among 4 peers: step {big['step_s']:.2f} s"
        if "loopback_limit_s" in big:
            repeats = big["repeats"]
            line += (f" (all-reduce {big['allreduce_s']} s); {big['bytes_sent'] / 1e9:.2f} GB sent, loopback "
                     f"{big['loopback_Bps'] / 1e9:.2f} GB/s -> limit {big['loopback_limit_s']:.2f} s; "
                     f"{big['ratio_to_limit']}x the limit (goal <= {GOAL_LOOPBACK:g}x)"
                     + (f"; median of {len(repeats)} rounds: {' / '.join(f'{r}x' for r in repeats)}" if len(repeats) > 1 else ""))
        line += f"; exact mean: {big['exact_mean']}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["hivesim", "hivemind"], default="hivesim")
    parser.add_argument("--against", choices=["hivemind"], help="also run hivemind on the same workload and print ratios")
    parser.add_argument("--hivemind-python", default=os.environ.get("HIVEMIND_PYTHON"),
                        help="Python that has hivemind installed (default: the HIVEMIND_PYTHON environment variable)")
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--min-matchmaking-time", type=float, default=5.0, help="hivemind only (hivesim adapts it)")
    parser.add_argument("--round-timeout", type=float, default=15.0)
    parser.add_argument("--request-timeout", type=float, default=1.0)
    parser.add_argument("--spawn-dtime", type=float, default=0.1)
    parser.add_argument("--allreduce-floats", type=float, default=100e6, help="0 skips workload 2")
    parser.add_argument("--allreduce-repeats", type=int, default=3, help="rounds of workload 2 in one swarm (the median is reported)")
    parser.add_argument("--hivemind-allreduce", action="store_true", help="also run workload 2 on hivemind")
    parser.add_argument("--only-allreduce", action="store_true", help="skip workload 1 (run workload 2 alone)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (used for the subprocess)")
    parser.add_argument("--aggregation", default="mean", choices=["mean", "centered_clip", "trimmed_mean", "median"],
                        help="how hivesim's reducers combine contributions (its cost beside the mean)")
    args = parser.parse_args()

    result = run_backend(args)
    if args.json:
        print("RESULT " + json.dumps(result))
        return
    show(result, args)
    if args.against != "hivemind":
        print(f"load average: {result['load']}")
        return
    if not args.hivemind_python:
        print("[hivemind] skipped: --against hivemind needs a Python with hivemind installed, in its own venv, given by "
              "--hivemind-python PATH or the HIVEMIND_PYTHON environment variable. Set one up with:\n"
              f"    {HIVEMIND_SETUP}\nthen pass --hivemind-python hivemind-venv/bin/python")
        print(f"load average: {result['load']}")
        return
    command = [args.hivemind_python, os.path.abspath(__file__), "--backend", "hivemind", "--json"]
    for name in ("peers", "group", "rounds", "hidden", "layers", "min_matchmaking_time", "round_timeout",
                 "request_timeout", "spawn_dtime", "allreduce_floats"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.hivemind_allreduce:
        command.append("--hivemind-allreduce")
    if args.only_allreduce:
        command.append("--only-allreduce")
    budget = args.rounds * (args.round_timeout + 30) * 2 + 600
    try:
        returncode, stdout, stderr = run_group(command, budget)
    except SubprocessTimeout:
        print(f"[hivemind] did not finish within {budget:.0f} s; its processes were killed")
        return
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not lines:
        print(f"[hivemind] failed (exit {returncode}):\n{stderr[-3000:]}")
        return
    other = json.loads(lines[-1][len("RESULT "):])
    show(other, args)
    ours, theirs = result["workload"], other["workload"]
    if not ours or not theirs:
        print(f"load average: {result['load']} (hivesim), {other['load']} (hivemind)")
        return
    speedup = theirs["seconds"] / max(ours["seconds"], 1e-9)
    print(f"speed-up hivemind / hivesim: {speedup:.1f}x (goal >= {GOAL_SPEEDUP:g}x: {'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}); "
          f"success {100 * ours['success_rate']:.1f}% vs {100 * theirs['success_rate']:.1f}%")
    if result.get("allreduce") and other.get("allreduce"):
        print(f"100M all-reduce: hivemind {other['allreduce']['step_s']:.2f} s vs hivesim {result['allreduce']['step_s']:.2f} s "
              f"({other['allreduce']['step_s'] / max(result['allreduce']['step_s'], 1e-9):.1f}x)")
    print(f"load average: {result['load']} (hivesim), {other['load']} (hivemind)")


if __name__ == "__main__":
    main()
