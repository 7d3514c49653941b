"""Reading a results folder, shared by every workload's figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / "samples.jsonl").exists():
        raise FileNotFoundError(f"{run_dir} is not a hivesim results folder (no samples.jsonl)")
    summary_path = run_dir / "summary.json"
    return {
        "dir": run_dir,
        "samples": read_jsonl(run_dir / "samples.jsonl"),
        "events": read_jsonl(run_dir / "events.jsonl"),
        "summary": json.loads(summary_path.read_text()) if summary_path.exists() else {},
    }


def run_start(run: dict[str, Any]) -> float:
    """Wall time of the run's t = 0 (the schedule's zero, ``summary.json``'s ``clock_zero``), so that a
    figure's time axis is the run's clock: a kill scheduled ``at: 15`` is drawn at 15 s. Folders written
    before ``clock_zero`` existed: recovered from an event's wall and run-clock times, else the earliest sample."""
    zero = run.get("summary", {}).get("clock_zero")
    if zero:
        return float(zero)
    recovered = [e["wall"] - e["actual_t"] for e in run["events"] if "wall" in e and "actual_t" in e]
    if recovered:
        return min(recovered)
    times = [s["t"] for s in run["samples"]] + [e["wall"] for e in run["events"] if "wall" in e]
    return min(times) if times else 0.0


def mark_events(ax: Any, run: dict[str, Any], t0: float) -> None:
    """Draw churn and fault events on a time axis: kills red, joins green, partitions shaded."""
    drawn = set()
    open_partition = None
    for event in run["events"]:
        action, t = event.get("action"), event.get("wall", t0) - t0
        if action == "kill":
            ax.axvline(t, color="tab:red", alpha=0.35, lw=1, label=None if "kill" in drawn else "peer killed")
            drawn.add("kill")
        elif action == "join":
            ax.axvline(t, color="tab:green", alpha=0.35, lw=1, ls="--", label=None if "join" in drawn else "peer (re)joined")
            drawn.add("join")
        elif action == "partition":
            open_partition = t
        elif action == "heal" and open_partition is not None:
            ax.axvspan(open_partition, t, color="tab:orange", alpha=0.15, label=None if "part" in drawn else "partition")
            drawn.add("part")
            open_partition = None
