"""Throughput against network latency: sequential model parallelism vs DMoE with concurrent trainers.

A model of ``layers`` remote layers (``ffn`` experts, hid ``hidden``) is spread over ``hosts`` expert
hosts. Every link has the same one-way latency (``ShapedLinks``), swept over ``latencies``.

* ``model_parallel``: one client, layer after layer (one expert per layer, ``mp{l}.0`` on host
  ``l % hosts``); a step costs at least ``2 x layers`` round trips (forward then backward), so its
  throughput falls like ``1 / latency``.
* ``dmoe``: ``clients`` concurrent trainers, each layer a ``RemoteMixtureOfExperts`` (k_best=1, so a
  sample costs the same compute as in the baseline) over a grid of ``experts_per_layer`` experts spread
  over the hosts; the waiting of one trainer overlaps the compute of the others, so throughput stays
  flat until the hosts are busy.

The client is the workload role (``ROLE``; ``topologies/dmoe_throughput.yaml`` runs one latency on
Ray); ``python -m experiments.dmoe_throughput`` sweeps latencies in one process (``LocalSwarm``),
changing every link's latency between phases, and draws the figure. Metric: ``step`` (duration) with
the step's start time, mode and batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from hivesim.moe import RemoteExpert, RemoteMixtureOfExperts
from hivesim.moe.beam_search import MoEBeamSearcher
from hivesim.roles import Role


class ThroughputClient(Role):
    """Runs forward+backward steps through the remote layers while ``active``."""

    name = "dmoe_throughput_client"

    def __init__(self, peer: Any, *, mode: str = "dmoe", layers: int = 4, hidden: int = 256, batch_size: int = 64,
                 experts_per_layer: int = 4, active: bool = True, timeout: float = 30.0) -> None:
        super().__init__(peer)
        if mode not in ("dmoe", "model_parallel"):
            raise ValueError(f"mode must be 'dmoe' or 'model_parallel', got {mode!r}")
        self.mode, self.layers, self.hidden, self.batch_size = mode, layers, hidden, batch_size
        self.experts_per_layer, self.active, self.timeout = experts_per_layer, active, timeout
        self.steps = 0
        self.busy = False  # a step is in flight

    async def start(self) -> None:
        dht = self.peer.dht
        if self.mode == "model_parallel":
            addresses = await self._find_single_experts()
            blocks = [RemoteExpert(f"mp{layer}.0", addresses[layer], endpoint=self.peer.endpoint,
                                   forward_timeout=self.timeout, backward_timeout=self.timeout) for layer in range(self.layers)]
        else:
            blocks = [RemoteMixtureOfExperts(self.hidden, [self.experts_per_layer], dht, f"layer{layer}", k_best=1,
                                             forward_timeout=self.timeout, cache_ttl=30.0) for layer in range(self.layers)]
        self.model = nn.Sequential(*blocks)
        self.peer.spawn(self._run(), name="dmoe_throughput.run")

    async def _find_single_experts(self) -> list[str]:
        searcher = MoEBeamSearcher(self.peer.dht, "mp0", [1])
        out = []
        for layer in range(self.layers):
            searcher.uid_prefix = f"mp{layer}"
            found = await searcher.find_best_experts([np.zeros((1, 1))], 1)
            if not found[0]:
                raise RuntimeError(f"no expert mp{layer}.0 declared")
            out.append(found[0][0].address)
        return out

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        x = torch.randn(self.batch_size, self.hidden)
        while True:
            if not self.active:
                await asyncio.sleep(0.02)
                continue
            started = time.time()
            self.busy = True
            try:
                await loop.run_in_executor(None, self._step, x)
            except Exception as e:  # noqa: BLE001 - counted; a failed step is not throughput
                self.peer.metrics.count("step_errors")
                self.peer.metrics.event("step_error", error=repr(e)[:200])
                await asyncio.sleep(0.1)
                continue
            finally:
                self.busy = False
            self.steps += 1
            self.peer.metrics.sample("step", time.time() - started, mode=self.mode, batch=self.batch_size, started=started)

    def _step(self, x: torch.Tensor) -> None:
        self.model(x.requires_grad_(False)).sum().backward()

    def status(self) -> dict[str, Any]:
        return {"steps": self.steps}


ROLE = ThroughputClient


def phase_throughput(samples: list[dict[str, Any]], mode: str, start: float, end: float) -> dict[str, float]:
    """Samples/s of ``mode`` in [start, end]: each step's batch counts in proportion to the part of the step
    that fell inside the window (steps longer than the window still count, and no edge effects)."""
    done = 0.0
    durations = []
    clients = set()
    for s in samples:
        if s["name"] != "step" or s.get("mode") != mode:
            continue
        s0, s1 = s["started"], s["started"] + s["value"]
        overlap = min(end, s1) - max(start, s0)
        if overlap > 0:
            done += s["batch"] * overlap / max(s["value"], 1e-9)
            durations.append(s["value"])
            clients.add(s["peer"])
    mean_step = float(np.mean(durations)) if durations else float("nan")
    return {"samples_per_s": done / max(end - start, 1e-9), "steps": len(durations), "clients": len(clients),
            "mean_step_s": mean_step}


def summarize(run: Any) -> dict[str, Any]:
    samples = run.samples if hasattr(run, "samples") else run
    steps = [s for s in samples if s["name"] == "step"]
    if not steps:
        return {"steps": 0}
    start, end = min(s["started"] for s in steps), max(s["started"] + s["value"] for s in steps)
    return {mode: phase_throughput(samples, mode, start, end) for mode in sorted({s["mode"] for s in steps})}


def headline(run: Any) -> str:
    recent = [s for s in run.named("step") if s["t"] > time.time() - 10]
    return f"{sum(s['batch'] for s in recent) / 10:.0f} samples/s" if recent else "steps: waiting"


async def sweep(latencies: list[float], *, hosts: int, layers: int, clients: int, hidden: int, batch_size: int,
                experts_per_layer: int, min_window: float, log: Any = print) -> tuple[list[dict], list[dict], list[dict]]:
    from experiments.dmoe_local import LocalSwarm
    from hivesim.moe.uids import make_uid

    from concurrent.futures import ThreadPoolExecutor

    # every client's step blocks a thread on its network calls: give each client one
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=clients + 8))
    current = [0.0]
    swarm = LocalSwarm(latency=lambda src, dst: current[0])
    phases: list[dict] = []
    try:
        for h in range(hosts):
            uids = [f"mp{layer}.0" for layer in range(layers) if layer % hosts == h]
            uids += [make_uid(f"layer{layer}", [e]) for layer in range(layers) for e in range(experts_per_layer)
                     if (layer * experts_per_layer + e) % hosts == h]
            await swarm.add(f"experts.{h}", {"expert_host": dict(expert_uids=uids, expert_cls="ffn", hidden_dim=hidden,
                                                                expiration=60, update_period=10, seed=h)})
        role = "experiments.dmoe_throughput:ROLE"
        common = dict(layers=layers, hidden=hidden, batch_size=batch_size, experts_per_layer=experts_per_layer, active=False)
        mp = (await swarm.add("mp_client.0", {role: dict(common, mode="model_parallel")})).roles[role]
        dmoe = [(await swarm.add(f"dmoe_client.{c}", {role: dict(common, mode="dmoe")})).roles[role] for c in range(clients)]
        # Declarations made while the swarm was two hosts live on those two nodes only; re-declare now that
        # every client has joined, so the records reach the nodes nearest to their keys (as the periodic
        # re-declaration would, a little later).
        for h in range(hosts):
            await swarm.peers[f"experts.{h}"].roles["expert_host"].server.declare()
        for mode, group in (("model_parallel", [mp]), ("dmoe", dmoe)):
            current[0] = latencies[0]
            first = [r.steps for r in group]
            for r in group:  # unmeasured warm-up: every client connects, searches and completes a step
                r.active = True
            warm_start = time.time()
            for _ in range(1200):
                if all(r.steps > s for r, s in zip(group, first)):
                    break
                await asyncio.sleep(0.1)
            step_time = time.time() - warm_start  # a (cold) step: windows span several steps of each client
            for latency in latencies:
                current[0] = latency
                for r in group:
                    r.active = True
                await asyncio.sleep(max(1.0, 4 * layers * latency))  # warm-up: caches, connections, a first step
                start = time.time()
                await asyncio.sleep(max(min_window, 3 * 4 * layers * latency, 3 * step_time))
                end = time.time()
                for r in group:
                    r.active = False
                for _ in range(600):  # let the steps in flight finish before the latency changes
                    if not any(r.busy for r in group):
                        break
                    await asyncio.sleep(0.1)
                phase = dict(mode=mode, latency=latency, start=start, end=end)
                phases.append(phase)
                got = phase_throughput(swarm.collect_peek(), mode, start, end)
                step_time = got["mean_step_s"] if got["steps"] else step_time
                log(f"  {mode:15s} latency {1000 * latency:5.0f} ms: {got['samples_per_s']:8.1f} samples/s "
                    f"({got['steps']} steps, {got['clients']} clients, mean step {got['mean_step_s']:.3f} s)")
        return swarm.collect(), swarm.events, phases
    finally:
        await swarm.close()


def main(argv: list[str] | None = None) -> None:
    from analysis.dmoe_throughput import make_figures
    from experiments.dmoe_local import results_folder, write_results

    parser = argparse.ArgumentParser(description="DMoE vs model-parallel throughput against latency, in one process")
    parser.add_argument("--latencies", default="0,0.01,0.025,0.05,0.1,0.2", help="one-way seconds per hop")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--experts-per-layer", type=int, default=4)
    parser.add_argument("--window", type=float, default=5.0, help="least seconds measured per point")
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    latencies = [float(v) for v in args.latencies.split(",")]
    samples, events, phases = asyncio.run(sweep(latencies, hosts=args.hosts, layers=args.layers, clients=args.clients,
                                                hidden=args.hidden, batch_size=args.batch_size,
                                                experts_per_layer=args.experts_per_layer, min_window=args.window))
    points = [dict(p, **phase_throughput(samples, p["mode"], p["start"], p["end"])) for p in phases]
    run_dir = results_folder("dmoe_throughput", args.results)
    write_results(run_dir, dict(vars(args), name="dmoe_throughput"), samples, events, {"workload": {"points": points}})
    figures = make_figures(run_dir)
    print(f"results: {run_dir}\nfigure:  {', '.join(map(str, figures))}")


if __name__ == "__main__":
    main()
