"""Figures of the dht_lookup workload: latency CDF, success over time with churn marked, hops vs log2 N."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.common import load_run, mark_events, run_start  # noqa: E402


def make_figures(run_dir: str | Path) -> list[Path]:
    run = load_run(run_dir)
    lookups = [s for s in run["samples"] if s["name"] == "lookup"]
    if not lookups:
        return []
    t0 = run_start(run)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    name = run["summary"].get("name", Path(run_dir).name)

    ax = axes[0]
    for subset, label, color in (([s for s in lookups if s["hops"] > 0], "over the network", "tab:blue"),
                                 (lookups, "all (incl. local replicas)", "tab:gray")):
        if subset:
            latency = np.sort([s["value"] * 1e3 for s in subset])
            ax.plot(latency, np.arange(1, len(latency) + 1) / len(latency), color=color, label=label)
    ax.set_xscale("log")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("lookup latency (ms)")
    ax.set_ylabel("fraction of lookups")
    ax.set_title("latency CDF")
    ax.grid(alpha=0.3)

    ax = axes[1]
    width = max(1.0, (max(s["t"] for s in lookups) - t0) / 40)
    bins: dict[int, list[bool]] = defaultdict(list)
    for s in lookups:
        bins[int((s["t"] - t0) // width)].append(bool(s["ok"]))
    xs = sorted(bins)
    ax.plot([(b + 0.5) * width for b in xs], [100 * np.mean(bins[b]) for b in xs], marker=".", color="tab:blue", label="lookups found")
    mark_events(ax, run, t0)
    ax.set_ylim(min(50, min(100 * np.mean(bins[b]) for b in xs) - 5), 101)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"success rate per {width:.0f} s (%)")
    ax.set_title("success over time")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[2]
    by_size: dict[int, list[int]] = defaultdict(list)
    for s in lookups:
        if s["hops"] > 0:
            by_size[s["swarm"]].append(s["hops"])
    sizes = sorted(by_size)
    ax.scatter([np.log2(n) for n in sizes], [np.mean(by_size[n]) for n in sizes], s=[10 + 2 * len(by_size[n]) ** 0.5 for n in sizes], color="tab:purple")
    ax.set_xlabel("log2(swarm size seen by the peer)")
    ax.set_ylabel("mean depth of network lookups (hops)")
    ax.set_title("hops vs log2 N")
    ax.grid(alpha=0.3)

    summary = run["summary"].get("workload", {})
    fig.suptitle(f"{name}: {summary.get('lookups', len(lookups))} lookups, {100 * summary.get('success_rate', 0):.2f}% found, "
                 f"network lookups p50 {summary.get('remote_latency_ms_p50', float('nan'))} ms", fontsize=11)
    fig.tight_layout()
    path = Path(run_dir) / "dht_lookup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
