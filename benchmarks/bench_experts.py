"""Expert-server throughput: N experts on one server, C client processes sending forward+backward.

    python benchmarks/bench_experts.py [--preset minimalistic|ffn_small] [--backend hivesim|hivemind]
        [--num-experts N --num-clients C --batches-per-client B --batch-size S --hid-dim H
         --max-batch-size M --handlers K] [--json]
    python benchmarks/bench_experts.py --against hivemind [--hivemind-python PATH]   # or HIVEMIND_PYTHON=PATH

The workload of hivemind's ``benchmarks/benchmark_throughput.py``: a server hosts ``num_experts``
``ffn`` experts (hid -> 4 hid -> hid, GELU, residual, LayerNorm; Adam) and ``num_clients`` client
*processes* (one torch thread each) each run ``batches_per_client`` iterations of: pick a random expert,
``out = expert(batch)``, ``out.sum().backward()`` (the server recomputes the forward, back-propagates and
steps the optimizer). Presets:

* ``minimalistic`` (hivemind's preset of that name): 1 expert, 1 client, 1 handler, hid 1024, batch 2048;
* ``ffn_small``: 4 experts, 4 clients, hid 256, batch 256 (many small concurrent requests: batching and
  per-request overhead matter more).

Each client runs one untimed warm-up iteration, then all start together. Printed: server start-up
time, samples/s (forward+backward), and the share of the wall time the server's runtime was *not*
inside the experts' own compute (``1 - compute / wall``: transfer, (de)serialization, batching, waiting).
The server lives in this process (a background thread), the clients in subprocesses.

``--against hivemind`` runs the same workload with hivemind's ``Server`` and ``RemoteExpert`` in a
subprocess of a Python that has hivemind, and prints the ratios. This file imports neither library at
module level.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from typing import Any

HIVEMIND_SETUP = ("python3 -m venv hivemind-venv && hivemind-venv/bin/pip install torch==2.13.0 && "
                  "hivemind-venv/bin/pip install hivemind==1.1.12 torch==2.13.0")
PRESETS: dict[str, dict[str, int]] = {
    "minimalistic": dict(num_experts=1, num_clients=1, handlers=1, batches_per_client=8, batch_size=2048,
                         hid_dim=1024, max_batch_size=4096),
    "ffn_small": dict(num_experts=4, num_clients=4, handlers=4, batches_per_client=32, batch_size=256,
                      hid_dim=256, max_batch_size=4096),
}


# ------------------------------------------------------------------------------------------------ clients
def _client(backend: str, target: Any, cfg: dict, seed: int, ready: Any, start: Any, results: Any) -> None:
    """One client process: build remote experts, warm up, wait for the start signal, run the batches."""
    import random

    import torch

    torch.set_num_threads(1)
    rng = random.Random(seed)
    uids = [f"expert.{i}" for i in range(cfg["num_experts"])]
    try:
        if backend == "hivesim":
            from hivesim.moe import RemoteExpert

            experts = [RemoteExpert(uid, target, forward_timeout=600, backward_timeout=600) for uid in uids]
        else:
            from hivemind import DHT
            from hivemind.moe.client.expert import create_remote_experts
            from hivemind.moe.expert_uid import ExpertInfo
            from hivemind.p2p import PeerID

            maddrs, peer_id = target
            dht = DHT(initial_peers=maddrs, client_mode=True, start=True)
            experts = create_remote_experts([ExpertInfo(uid, PeerID.from_base58(peer_id)) for uid in uids], dht)
        batch = torch.randn(cfg["batch_size"], cfg["hid_dim"])
        rng.choice(experts)(batch).sum().backward()  # warm-up, untimed
        ready.put(os.getpid())
        start.wait()
        for _ in range(cfg["batches_per_client"]):
            out = rng.choice(experts)(batch)
            out.sum().backward()
        results.put(("ok", os.getpid()))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        ready.put(os.getpid())
        results.put(("error", repr(e)))


def _drive_clients(backend: str, target: Any, cfg: dict, compute_seconds: Any) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_client, args=(backend, target, cfg, i, ready, start, results))
             for i in range(cfg["num_clients"])]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=300)
        compute0 = compute_seconds()
        t0 = time.perf_counter()
        start.set()
        outcomes = [results.get(timeout=1800) for _ in procs]
        wall = time.perf_counter() - t0
        compute = compute_seconds() - compute0
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [o[1] for o in outcomes if o[0] != "ok"]
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]}")
    samples = cfg["num_clients"] * cfg["batches_per_client"] * cfg["batch_size"]
    out = {"samples": samples, "wall_s": wall, "samples_per_s": samples / wall}
    if compute is not None:
        out["expert_compute_s"] = compute
        out["outside_compute_share"] = max(0.0, 1 - compute / wall)
    return out


# ------------------------------------------------------------------------------------------------ servers
def run_hivesim(cfg: dict) -> dict[str, Any]:
    import asyncio

    import torch

    from hivesim.moe import ExpertServer

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    server = ExpertServer.create([f"expert.{i}" for i in range(cfg["num_experts"])], "ffn", cfg["hid_dim"],
                                 device=cfg.get("device"), max_batch_size=cfg["max_batch_size"])
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
    startup = time.perf_counter() - t0
    try:
        result = _drive_clients("hivesim", server.address, cfg, lambda: server.runtime.stats.compute_seconds)
        result["server_batches"] = server.runtime.stats.batches
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
    result["startup_s"] = startup
    return result


def run_hivemind(cfg: dict) -> dict[str, Any]:
    import torch
    from hivemind import DHT
    from hivemind.moe.server import Server
    from hivemind.moe.server.module_backend import ModuleBackend

    compute = [0.0]
    original_forward, original_backward = ModuleBackend.forward, ModuleBackend.backward

    def timed(fn: Any) -> Any:
        def wrapper(self: Any, *args: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(self, *args)
            finally:
                compute[0] += time.perf_counter() - t

        return wrapper

    # Measures hivemind's expert compute the same way as hivesim's (forward; recompute+backward+step);
    # the wrapped methods include hivemind's own small pre/post-processing, so this slightly favours it.
    ModuleBackend.forward, ModuleBackend.backward = timed(original_forward), timed(original_backward)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dht = DHT(start=True)
    server = Server.create(expert_uids=[f"expert.{i}" for i in range(cfg["num_experts"])], expert_cls="ffn",
                           hidden_dim=cfg["hid_dim"], num_handlers=cfg["handlers"], max_batch_size=cfg["max_batch_size"],
                           device=cfg.get("device") or "cpu", initial_peers=dht.get_visible_maddrs(), start=True)
    server.ready.wait()
    startup = time.perf_counter() - t0
    try:
        target = ([str(a) for a in server.dht.get_visible_maddrs()], server.dht.peer_id.to_base58())
        result = _drive_clients("hivemind", target, cfg, lambda: compute[0])
    finally:
        server.shutdown()
        dht.shutdown()
    result["startup_s"] = startup
    return result


# ------------------------------------------------------------------------------------------------ report
def _describe(name: str, r: dict[str, Any]) -> str:
    line = (f"{name:9s} start-up {r['startup_s']:.2f} s | {r['samples_per_s']:8.1f} samples/s fwd+bwd "
            f"({r['samples']} samples in {r['wall_s']:.1f} s)")
    if "outside_compute_share" in r:
        line += f" | outside expert compute {100 * r['outside_compute_share']:.1f}% of wall"
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="minimalistic")
    parser.add_argument("--backend", choices=["hivesim", "hivemind"], default="hivesim")
    parser.add_argument("--against", choices=["hivemind"], default=None)
    parser.add_argument("--hivemind-python", default=os.environ.get("HIVEMIND_PYTHON"),
                        help="Python that has hivemind installed (default: the HIVEMIND_PYTHON environment variable)")
    for key in PRESETS["minimalistic"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--device", default=None, help="server device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON line (used by --against)")
    args = parser.parse_args(argv)
    cfg: dict[str, Any] = dict(PRESETS[args.preset])
    for key in PRESETS["minimalistic"]:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["device"] = args.device
    run = run_hivesim if args.backend == "hivesim" else run_hivemind
    if not args.json:
        load = os.getloadavg()
        print(f"preset {args.preset}: {cfg}  (load average {load[0]:.2f}, {os.cpu_count()} CPUs)", flush=True)
    result = run(cfg)
    if args.json:
        print(json.dumps(result))
        return
    print(_describe(args.backend, result), flush=True)
    if args.against and not args.hivemind_python:
        print("hivemind's side skipped: --against hivemind needs a Python with hivemind installed, in its own venv, "
              "given by --hivemind-python PATH or the HIVEMIND_PYTHON environment variable. Set one up with:\n"
              f"    {HIVEMIND_SETUP}\nthen pass --hivemind-python hivemind-venv/bin/python", flush=True)
    elif args.against:
        cmd = [args.hivemind_python, os.path.abspath(__file__), "--backend", "hivemind", "--json", "--preset", args.preset]
        for key in PRESETS["minimalistic"]:
            cmd += [f"--{key.replace('_', '-')}", str(cfg[key])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"hivemind run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            sys.exit(1)
        other = json.loads(lines[-1])
        print(_describe("hivemind", other))
        ratio = result["samples_per_s"] / other["samples_per_s"]
        print(f"ratio hivesim/hivemind: samples/s x{ratio:.2f}, start-up x{other['startup_s'] / result['startup_s']:.2f} "
              f"faster; goal samples/s >= hivemind: {'met' if ratio >= 1 else 'NOT met'}; "
              f"goal outside-compute share < 10%: {'met' if result['outside_compute_share'] < 0.10 else 'NOT met'} "
              f"({100 * result['outside_compute_share']:.1f}%)")


if __name__ == "__main__":
    main()
