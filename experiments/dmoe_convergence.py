"""DMoE convergence under failures: the learning@home MNIST experiment, scaled to scikit-learn's digits.

Every trainer peer trains its own classifier ``Linear(64 -> hidden) -> ReLU -> L x DMoE layer -> Linear(hidden
-> 10)`` (Adam); the DMoE layers' experts (residual FFN blocks with LayerNorm) live on expert-host peers
and are shared by all trainers, each taking its own optimizer step on every backward it receives, so the
experts train asynchronously with stale, concurrent updates, as in the paper. Setups:

* ``dmoe``: grid ``grid_size`` per layer, each sample uses its ``k_best`` best experts;
* ``dmoe_fail10``: the same, with each (sample, expert) pair unavailable with probability 0.1 before the
  top-k (the paper's "10% of experts fail": their logits are masked per sample);
* ``dmoe_churn``: the same as ``dmoe`` while expert hosts die abruptly (one comes back from its checkpoint);
* ``dense``: one wide residual FFN per layer (width chosen for the per-sample FLOPs of ``k_best`` experts),
  hosted and trained the same way.

The trainer is the workload role (``ROLE``; ``topologies/dmoe_convergence.yaml`` runs one setup on Ray);
``python -m experiments.dmoe_convergence`` runs every setup in one process (``LocalSwarm``) and draws the
figure. Metrics: ``train_step`` (loss) per update and ``val_accuracy`` every ``eval_every`` updates.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from hivesim.moe import NoExpertsAvailable, RemoteMixtureOfExperts
from hivesim.roles import Role

SETUPS = ("dmoe", "dmoe_fail10", "dmoe_churn", "dense")


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (ships with the package: nothing is downloaded), standardised, split
    1397 train / 400 validation with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train_x, val_x = x[400:], x[:400]
    mean, std = train_x.mean(0), train_x.std(0) + 1.0
    return (train_x - mean) / std, y[400:], (val_x - mean) / std, y[:400]


def dense_width(hidden: int, ff_dim: int, k: int) -> int:
    """Hidden width of one residual FFN (h -> w -> w -> h) with the FLOPs of ``k`` experts of width ``ff_dim``."""
    flops = k * (2 * hidden * ff_dim + ff_dim * ff_dim)
    return int(round(-hidden + math.sqrt(hidden * hidden + flops)))


class DMoETrainer(Role):
    """A trainer peer: local input/output layers and gates, remote experts."""

    name = "dmoe_trainer"

    def __init__(self, peer: Any, *, setup: str = "dmoe", layers: int = 2, uid_prefix: str = "ffn",
                 grid_size: list[int] | None = None, k_best: int = 4, hidden: int = 64, lr: float = 1e-3,
                 batch_size: int = 32, eval_every: int = 10, failure_rate: float = 0.0, forward_timeout: float = 5.0,
                 timeout_after_k_min: float | None = 1.0, delay: float = 0.0, max_updates: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(peer)
        self.setup = setup
        self.layers, self.uid_prefix = layers, uid_prefix
        self.grid_size = list(grid_size or [4, 4])
        self.k_best, self.hidden, self.lr = k_best, hidden, lr
        self.batch_size, self.eval_every = batch_size, eval_every
        self.failure_rate, self.forward_timeout, self.timeout_after_k_min = failure_rate, forward_timeout, timeout_after_k_min
        self.delay, self.max_updates = delay, max_updates
        self.rng = random.Random(f"{seed}:{peer.name}")
        self.updates = 0
        self.errors = 0
        self.model: nn.Module | None = None

    async def start(self) -> None:
        torch.manual_seed(self.rng.randrange(1 << 30))
        moes = [RemoteMixtureOfExperts(self.hidden, self.grid_size, self.peer.dht, f"{self.uid_prefix}{layer}",
                                       k_best=self.k_best, forward_timeout=self.forward_timeout,
                                       timeout_after_k_min=self.timeout_after_k_min, failure_rate=self.failure_rate,
                                       seed=self.rng.randrange(1 << 30))
                for layer in range(self.layers)]
        self.model = nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), *moes, nn.Linear(self.hidden, 10))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        self.peer.spawn(self._train(), name="dmoe_trainer.train")

    async def _train(self) -> None:
        loop = asyncio.get_running_loop()
        while self.max_updates is None or self.updates < self.max_updates:
            try:
                loss = await loop.run_in_executor(None, self._compute_gradients)
            except (NoExpertsAvailable, RuntimeError) as e:
                self.errors += 1
                self.peer.metrics.count("step_errors")
                self.peer.metrics.event("step_error", error=repr(e)[:200])
                await asyncio.sleep(0.5)
                continue
            if self.delay:
                await asyncio.sleep(self.delay * self.rng.expovariate(1.0))
            self.optimizer.step()
            self.updates += 1
            self.peer.metrics.sample("train_step", loss, setup=self.setup, local_updates=self.updates)
            if self.updates % self.eval_every == 0:
                accuracy = await loop.run_in_executor(None, self._evaluate)
                if accuracy is not None:
                    self.peer.metrics.sample("val_accuracy", accuracy, setup=self.setup, local_updates=self.updates)

    def _compute_gradients(self) -> float:
        train_x, train_y, _, _ = digits()
        index = torch.tensor(self.rng.sample(range(len(train_x)), self.batch_size))
        self.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self.model(train_x[index]), train_y[index])
        loss.backward()
        return float(loss.detach())

    def _evaluate(self) -> float | None:
        _, _, val_x, val_y = digits()
        try:
            with torch.no_grad():
                return float((self.model(val_x).argmax(1) == val_y).float().mean())
        except (NoExpertsAvailable, RuntimeError):
            return None

    def status(self) -> dict[str, Any]:
        return {"updates": self.updates, "errors": self.errors}


ROLE = DMoETrainer


# ------------------------------------------------------------------------------------------------ summaries
def _global_updates(samples: list[dict[str, Any]], setup: str) -> list[tuple[float, float]]:
    """(global update count, accuracy) for every evaluation of ``setup``: updates of all trainers so far."""
    steps = sorted(s["t"] for s in samples if s["name"] == "train_step" and s.get("setup") == setup)
    evals = sorted((s["t"], s["value"]) for s in samples if s["name"] == "val_accuracy" and s.get("setup") == setup)
    return [(float(np.searchsorted(steps, t, side="right")), acc) for t, acc in evals]


def accuracy_curve(samples: list[dict[str, Any]], setup: str, bins: int = 12) -> list[tuple[float, float]]:
    points = _global_updates(samples, setup)
    if not points:
        return []
    top = max(u for u, _ in points)
    width = max(1.0, top / bins)
    grouped: dict[int, list[float]] = {}
    for u, acc in points:
        grouped.setdefault(int(u // width), []).append(acc)
    return [((b + 0.5) * width, float(np.mean(v))) for b, v in sorted(grouped.items())]


def summarize(run: Any) -> dict[str, Any]:
    samples = run.samples if hasattr(run, "samples") else run
    out: dict[str, Any] = {}
    for setup in sorted({s.get("setup") for s in samples if s["name"] == "val_accuracy"}):
        points = _global_updates(samples, setup)
        final = [acc for u, acc in points if u >= 0.8 * max(p[0] for p in points)]
        steps = [s for s in samples if s["name"] == "train_step" and s.get("setup") == setup]
        out[setup] = {"updates": len(steps), "final_val_accuracy": round(float(np.mean(final)), 4),
                      "updates_to_90pct": next((int(u) for u, a in accuracy_curve(samples, setup) if a >= 0.9), None)}
    return out


def headline(run: Any) -> str:
    accs = [s["value"] for s in run.named("val_accuracy")[-8:]]
    return f"val accuracy {np.mean(accs):.3f}" if accs else "training: waiting"


# ------------------------------------------------------------------------------------------------ local driver
async def run_setup(setup: str, *, hosts: int, trainers: int, updates: int, latency: float, layers: int,
                    grid: list[int], k_best: int, hidden: int, ff_dim: int, checkpoint_root: str, seed: int = 0,
                    log: Any = print) -> tuple[list[dict], list[dict]]:
    """Run one setup to ``updates`` global updates in a LocalSwarm; returns (samples, events)."""
    from experiments.dmoe_local import LocalSwarm

    swarm = LocalSwarm(latency=latency, seed=seed)
    dense = setup == "dense"
    host_params: dict[str, Any] = dict(expert_cls="residual_ffn", hidden_dim=hidden, lr=1e-3, expiration=6.0,
                                       update_period=2.0, seed=seed, max_batch_size=1024)
    try:
        for h in range(hosts):
            params = dict(host_params)
            if dense:
                params["expert_uids"] = [f"dense{layer}.0" for layer in range(layers) if layer % hosts == h]
                params["expert_kwargs"] = {"ff_dim": dense_width(hidden, ff_dim, k_best)}
            else:
                params.update(uid_prefixes=[f"ffn{layer}" for layer in range(layers)], grid_size=grid, hosts=hosts,
                              expert_kwargs={"ff_dim": ff_dim})
                if setup == "dmoe_churn":
                    params.update(checkpoint_dir=f"{checkpoint_root}/host{h}", checkpoint_period=2.0)
            await swarm.add(f"experts.{h}", {"expert_host": params})
        per_trainer = math.ceil(updates / trainers)
        trainer = dict(setup=setup, layers=layers, uid_prefix="dense" if dense else "ffn",
                       grid_size=[1] if dense else grid, k_best=1 if dense else k_best, hidden=hidden,
                       failure_rate=0.1 if setup == "dmoe_fail10" else 0.0, max_updates=per_trainer, seed=seed)
        for t in range(trainers):
            await swarm.add(f"trainers.{t}", {"experiments.dmoe_convergence:ROLE": trainer})
        roles = [swarm.peers[f"trainers.{t}"].roles["experiments.dmoe_convergence:ROLE"] for t in range(trainers)]
        plan = [(0.3, "kill", "experts.0"), (0.5, "rejoin", "experts.0"), (0.7, "kill", "experts.1")] if setup == "dmoe_churn" else []
        t0 = time.time()
        while any(r.updates < per_trainer for r in roles):
            done = sum(r.updates for r in roles)
            while plan and done >= plan[0][0] * updates:
                _, action, name = plan.pop(0)
                if action == "kill":
                    await swarm.kill(name)
                else:  # a fresh peer under the same name restores the experts from their checkpoint
                    await swarm.rejoin(name)
                log(f"  {setup}: {action} {name} at {done} updates")
            await asyncio.sleep(0.2)
            if time.time() - t0 > 1800:
                log(f"  {setup}: stopped after 30 min at {done} updates")
                break
        log(f"  {setup}: {sum(r.updates for r in roles)} updates in {time.time() - t0:.1f} s, "
            f"{sum(r.errors for r in roles)} failed steps")
        return swarm.collect(), swarm.events
    finally:
        await swarm.close()


def main(argv: list[str] | None = None) -> None:
    import tempfile

    from analysis.dmoe_convergence import make_figures
    from experiments.dmoe_local import results_folder, write_results

    parser = argparse.ArgumentParser(description="DMoE convergence under failures (digits), all setups in one process")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--updates", type=int, default=400, help="global updates per setup (full size: 3000)")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--trainers", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--grid", default="4,4")
    parser.add_argument("--k-best", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ff-dim", type=int, default=128)
    parser.add_argument("--latency", type=float, default=0.01, help="one-way seconds per link")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = dict(vars(args), name="dmoe_convergence", grid=[int(g) for g in args.grid.split(",")])
    samples: list[dict] = []
    events: list[dict] = []
    with tempfile.TemporaryDirectory() as checkpoints:
        for setup in args.setups.split(","):
            print(f"setup {setup}: {args.hosts} expert hosts, {args.trainers} trainers, {args.updates} updates", flush=True)
            s, e = asyncio.run(run_setup(setup, hosts=args.hosts, trainers=args.trainers, updates=args.updates,
                                         latency=args.latency, layers=args.layers, grid=config["grid"], k_best=args.k_best,
                                         hidden=args.hidden, ff_dim=args.ff_dim, checkpoint_root=checkpoints, seed=args.seed))
            samples += s
            events += [dict(ev, setup=setup) for ev in e]
    run_dir = results_folder("dmoe_convergence", args.results)
    summary = {"workload": summarize(samples)}
    write_results(run_dir, config, samples, events, summary)
    figures = make_figures(run_dir)
    for setup, numbers in summary["workload"].items():
        print(f"{setup:12s} {numbers}")
    print(f"results: {run_dir}\nfigure:  {', '.join(map(str, figures))}")


if __name__ == "__main__":
    main()
