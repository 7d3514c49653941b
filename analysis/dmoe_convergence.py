"""Figure of the DMoE convergence study: validation accuracy against global updates, one line per setup."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.common import load_run  # noqa: E402
from experiments.dmoe_convergence import accuracy_curve  # noqa: E402

STYLE = {"dmoe": ("DMoE", "tab:blue", "-"), "dmoe_fail10": ("DMoE, 10% of experts failing", "tab:orange", "-"),
         "dmoe_churn": ("DMoE, expert hosts killed", "tab:red", "--"), "dense": ("dense (same FLOPs/sample)", "tab:gray", "-")}


def make_figures(run_dir: str | Path) -> list[Path]:
    run = load_run(run_dir)
    samples = run["samples"]
    setups = [s for s in STYLE if any(x.get("setup") == s for x in samples)] or sorted({x.get("setup") for x in samples} - {None})
    if not setups:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for setup in setups:
        curve = accuracy_curve(samples, setup, bins=15)
        if not curve:
            continue
        label, color, ls = STYLE.get(setup, (setup, None, "-"))
        ax.plot([u for u, _ in curve], [a for _, a in curve], marker=".", color=color, ls=ls, label=label)
        if setup == "dmoe_churn":
            steps = np.sort([s["t"] for s in samples if s["name"] == "train_step" and s.get("setup") == setup])
            for event in run["events"]:
                if event.get("setup", setup) == setup and event.get("action") in ("kill", "join") and event.get("peer", "").startswith("experts") \
                        and event.get("wall", 0) > steps[0]:
                    u = np.searchsorted(steps, event["wall"])
                    ax.axvline(u, color="tab:red" if event["action"] == "kill" else "tab:green", alpha=0.4, lw=1)
    summary = run["summary"].get("workload", {})
    ax.set_xlabel("global updates (all trainers)")
    ax.set_ylabel("validation accuracy (digits, mean over trainers)")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    cfg = run["summary"].get("name", "dmoe_convergence")
    finals = ", ".join(f"{k} {v['final_val_accuracy']:.2f}" for k, v in summary.items())
    ax.set_title(f"{cfg}: final accuracy {finals}", fontsize=9)
    fig.tight_layout()
    path = Path(run_dir) / "dmoe_convergence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
