"""Figure of the collaborative_training workload: held-out loss and epoch against time, one line per peer.

Left: every trainer's held-out loss, evaluated at each of its epochs; right: every trainer's epoch (a state
download shows as a jump, marked with a circle) and, dashed, the swarm's epoch as the monitor read it from
the DHT. Kills (red) and joins (green) are marked on both. Reads the results folder only.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis.common import load_run, mark_events, run_start  # noqa: E402


def make_figures(run_dir: str | Path) -> list[Path]:
    run = load_run(run_dir)
    by_peer: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for s in sorted(run["samples"], key=lambda s: s["t"]):
        by_peer[s["peer"]][s["name"]].append(s)
    trainers = sorted(p for p, named in by_peer.items() if named.get("eval") or named.get("epoch"))
    if not trainers:
        return []
    t0 = run_start(run)
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(trainers)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))

    ax = axes[0]
    for peer in trainers:
        evals = by_peer[peer]["eval"]
        if evals:
            ax.plot([s["t"] - t0 for s in evals], [s["value"] for s in evals], marker=".", ms=4, lw=1.2,
                    color=colors[peer], label=peer)
    mark_events(ax, run, t0)
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("held-out loss (cross-entropy)")
    ax.set_title("held-out loss per peer")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[1]
    for peer in trainers:
        epochs = by_peer[peer]["epoch"]
        if not epochs:
            continue
        first = by_peer[peer]["eval"][:1] or epochs[:1]
        xs = [first[0]["t"] - t0] + [s["t"] - t0 for s in epochs]
        ys = [first[0].get("epoch", 0) if first is not epochs[:1] else epochs[0].get("previous", 0)] + [s["value"] for s in epochs]
        ax.step(xs, ys, where="post", color=colors[peer], lw=1.2, label=peer)
        downloads = [s for s in epochs if s.get("downloaded")]
        if downloads:
            ax.scatter([s["t"] - t0 for s in downloads], [s["value"] for s in downloads], s=40, facecolors="none",
                       edgecolors=colors[peer], zorder=3)
    monitor = [s for named in by_peer.values() for s in named.get("swarm_progress", [])]
    if monitor:
        ax.plot([s["t"] - t0 for s in monitor], [s["value"] for s in monitor], color="black", ls="--", lw=1,
                label="swarm (monitor)")
    if any(s.get("downloaded") for p in trainers for s in by_peer[p]["epoch"]):
        ax.scatter([], [], s=40, facecolors="none", edgecolors="gray", label="state downloaded")
    mark_events(ax, run, t0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("epoch (optimizer steps of the swarm)")
    ax.set_title("epoch per peer")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)

    summary = run["summary"].get("workload", {})
    name = run["summary"].get("name", Path(run_dir).name)
    bits = [f"{summary.get('trainers', len(trainers))} trainers", f"epoch {summary.get('epochs_max', '?')}"]
    if summary.get("initial_test_loss") is not None and summary.get("final_test_loss") is not None:
        bits.append(f"held-out loss {summary['initial_test_loss']:.2f} -> {summary['final_test_loss']:.2f}")
    if summary.get("final_test_accuracy") is not None:
        bits.append(f"accuracy {summary['final_test_accuracy']:.2f}")
    if summary.get("averaged_share") is not None:
        bits.append(f"{100 * summary['averaged_share']:.0f}% of epochs averaged")
    fig.suptitle(f"{name}: " + ", ".join(bits), fontsize=10)
    fig.tight_layout()
    path = Path(run_dir) / "collaborative_training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
