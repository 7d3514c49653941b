"""Figure of the throughput study: samples/s against one-way latency per hop, model parallel vs DMoE."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis.common import load_run  # noqa: E402
from experiments.dmoe_throughput import phase_throughput  # noqa: E402

LABELS = {"model_parallel": ("sequential model parallel (1 client)", "tab:gray"),
          "dmoe": ("DMoE (concurrent trainers)", "tab:blue")}


def _points(run: dict) -> list[dict]:
    points = run["summary"].get("workload", {}).get("points")
    if points:
        return points
    # a `hivesim run` of one latency: one point per mode over the whole run
    steps = [s for s in run["samples"] if s["name"] == "step"]
    if not steps:
        return []
    start, end = min(s["started"] for s in steps), max(s["started"] + s["value"] for s in steps)
    latency = 0.0
    config = Path(run["dir"]) / "config.yaml"
    if config.exists():  # a hivesim run: the topology's constant latency
        import yaml

        value = (yaml.safe_load(config.read_text()).get("network") or {}).get("latency", 0.0)
        latency = float(value) if isinstance(value, (int, float)) else 0.0
    return [dict(mode=m, latency=latency, **phase_throughput(run["samples"], m, start, end))
            for m in sorted({s["mode"] for s in steps})]


def make_figures(run_dir: str | Path) -> list[Path]:
    run = load_run(run_dir)
    points = _points(run)
    if not points:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, (label, color) in LABELS.items():
        mine = sorted((p for p in points if p["mode"] == mode), key=lambda p: p["latency"])
        if not mine:
            continue
        xs = [1000 * p["latency"] for p in mine]
        ax.plot(xs, [p["samples_per_s"] for p in mine], marker="o", color=color, label=label)
        if mode == "model_parallel" and mine[0]["latency"] == 0 and mine[0]["mean_step_s"] == mine[0]["mean_step_s"]:
            cfg = run["summary"]
            layers = next((p.get("layers") for p in [cfg] if p.get("layers")), None)
            base, batch = mine[0]["mean_step_s"], mine[0]["samples_per_s"] * mine[0]["mean_step_s"]
            hops = 4 * (layers or 4)  # forward and backward: a round trip (2 one-way hops) per layer each
            ax.plot(xs, [batch / (base + hops * p["latency"]) for p in mine], ls=":", color=color,
                    label=f"batch / (step at 0 ms + {hops} x latency)")
    ax.set_xlabel("one-way latency per hop (ms)")
    ax.set_ylabel("training throughput (samples/s, forward+backward)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("throughput vs latency", fontsize=10)
    fig.tight_layout()
    path = Path(run_dir) / "dmoe_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
