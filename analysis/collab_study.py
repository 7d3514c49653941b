"""Figures and table of the collaborative-training study (``experiments/collab_study.py``).

    python -m analysis.collab_study DIR       # DIR/study.json -> DIR/collab_study.png, DIR/collab_study.md

Reads only results folders: ``DIR/study.json`` lists the runs (label, method, setup, results folder, peer group)
and each folder's ``samples.jsonl`` holds the trainers' ``eval`` samples (held-out loss with the peer's running
``samples_total``, ``bytes_sent_total``, ``compute_s``, ``wall_s``), ``round`` samples (each averaging round's
outcome) and ``trainer_done``. ``make_figures(run_dir)`` is the per-run figure ``hivesim run`` makes (held-out loss per peer).

A method's curve: its trainers' evaluations grouped by epoch (every peer of a swarm holds the same parameters
right after an epoch, or an outer step); a point is the mean held-out loss of the group, at the latest of its
times, with the swarm's samples so far (the sum of every trainer's latest count) and the bytes sent per peer so
far (the mean over the trainers seen so far of their endpoint's count, DHT traffic included).

Table: final held-out loss (mean over the trainers that finished), samples, wall time (start of training to the
last trainer done), bytes sent per peer in all and until the curve first reached the target loss, compute
utilisation (forward/backward seconds over wall seconds, summed over trainers: on the 2-core VM the peers share
the cores, so a peer's compute time includes waiting for a core), and the share of averaging rounds in which
every peer that ran the round averaged, in one group of all of them.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"gradient_averaging": "tab:blue", "local_updates": "tab:orange", "diloco": "tab:green",
          "diloco_streaming": "tab:olive", "alone": "black", "hivemind": "tab:red"}
PAPERS = """\
| paper | setting | what it reports |
| --- | --- | --- |
| DiLoCo (Douillard et al. 2023, arXiv 2311.08105) | 8 workers, H=500 inner AdamW steps, outer SGD Nesterov 0.9 lr 0.7, C4 | perplexity matching synchronous training while communicating ~500x less |
| Streaming DiLoCo (arXiv 2501.18512) | parameters in fragments synced on a staggered schedule, overlapped, 4-bit outer updates | "up to two orders of magnitude" less peak bandwidth at equal quality |
| OpenDiLoCo (arXiv 2407.07852) | DiLoCo on hivemind's DHT and averager, 1.1B parameters, two continents | 90-95% compute utilisation; fp16 all-reduce of pseudo-gradients with no loss in quality |
| INTELLECT-1 (arXiv 2412.01152) | 10B parameters, up to 14 nodes on 3 continents, 100 inner steps, int8 all-reduce | 400x less bandwidth than data-parallel; 83-96% compute utilisation |
| DeDLOC (arXiv 2106.10207) | gradient averaging to a global target batch, load-balanced all-reduce | equivalent to large-batch SGD |
"""


def _read_samples(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "samples.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


START_WINDOW_S = 10.0  # evaluations before any step, this soon after the first one, are the common starting point


def method_data(samples: list[dict[str, Any]], group: str | None) -> dict[str, Any]:
    """Curve and headline numbers of one method (the trainers of ``group``, or every trainer)."""
    mine = sorted((s for s in samples if group is None or s["peer"].split(".", 1)[0] == group), key=lambda s: s["t"])
    trainers = sorted({s["peer"] for s in mine if s["name"] == "eval"})
    mine = [s for s in mine if s["peer"] in trainers]
    if not trainers:
        return {"trainers": 0, "curve": []}
    t0 = min(s["t"] for s in mine if s["name"] == "eval")
    latest_samples: dict[str, int] = {}
    latest_bytes: dict[str, int] = {}
    groups: dict[Any, list[tuple[float, float, int, float]]] = defaultdict(list)
    for s in mine:
        if "samples_total" in s:
            latest_samples[s["peer"]] = s["samples_total"]
        if "bytes_sent_total" in s:
            latest_bytes[s["peer"]] = s["bytes_sent_total"]
        if s["name"] == "eval":
            key = s.get("epoch", 0) if s.get("samples_total", 0) else "start"
            if key == "start" and s["t"] - t0 > START_WINDOW_S:
                continue  # a newcomer's evaluation before it downloaded the swarm's state: not the swarm's loss
            groups[key].append((s["t"] - t0, s["value"], sum(latest_samples.values()),
                                sum(latest_bytes.values()) / max(1, len(latest_bytes))))
    curve = []
    for key, points in groups.items():
        start = key == "start"  # every peer's eval before its first step: the common starting point
        curve.append({"wall_s": max(p[0] for p in points), "loss": sum(p[1] for p in points) / len(points),
                      "samples": 0 if start else max(p[2] for p in points),
                      "bytes_per_peer": 0.0 if start else max(p[3] for p in points)})
    curve.sort(key=lambda p: (p["samples"], p["wall_s"]))
    by_peer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in mine:
        by_peer[s["peer"]].append(s)
    last = {p: [s for s in ss if "wall_s" in s][-1] for p, ss in by_peer.items() if any("wall_s" in s for s in ss)}
    done = {p: [s for s in ss if s["name"] == "trainer_done"] for p, ss in by_peer.items()}
    finals = [[s for s in by_peer[p] if s["name"] == "eval"][-1]["value"] for p in trainers if done.get(p)]
    compute = sum(s.get("compute_s", 0.0) for s in last.values())
    wall = sum(s.get("wall_s", 0.0) for s in last.values())
    transitions: dict[int, list[dict[str, Any]]] = defaultdict(list)
    rounds = [s for s in mine if s["name"] == "round"]
    if rounds:  # one sample per finished round, background rounds included
        for s in rounds:
            transitions[s["value"]].append(s)
    else:  # results written before trainers recorded rounds: the transition's report
        for s in mine:
            if s["name"] == "epoch" and not s.get("downloaded"):
                transitions[s["value"]].append(s)
    all_averaged = [all(t.get("averaged") for t in ts) and min(t.get("group_size", 0) for t in ts) >= len(ts)
                    for ts in transitions.values()]
    failed = [s.get("reason") for ss in done.values() for s in ss if str(s.get("reason", "")).startswith(("failed", "error"))]
    ends = [s["t"] for ss in done.values() for s in ss]
    return {
        "trainers": len(trainers),
        "curve": curve,
        "initial_loss": next((p["loss"] for p in curve if p["samples"] == 0), None),
        "final_loss": sum(finals) / len(finals) if finals else None,
        "samples": sum(s.get("samples_total", 0) for s in last.values()),
        "bytes_per_peer": sum(s.get("bytes_sent_total", 0) for s in last.values()) / max(1, len(last)),
        "wall_s": (max(ends) - t0) if ends else None,
        "utilisation": compute / wall if wall > 0 else None,
        "all_averaged_share": sum(all_averaged) / len(all_averaged) if all_averaged else None,
        "epochs": len(transitions),
        "failures": failed,
    }


def first_reaching(curve: list[dict[str, Any]], target: float, key: str) -> float | None:
    for p in curve:
        if p["samples"] and p["loss"] <= target:
            return p[key]
    return None


def load_study(study_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    study = json.loads((study_dir / "study.json").read_text())
    cache: dict[str, list[dict[str, Any]]] = {}
    rows = []
    for entry in study["runs"]:
        if entry["run_dir"] not in cache:
            cache[entry["run_dir"]] = _read_samples(study_dir / entry["run_dir"])
        rows.append({**entry, **method_data(cache[entry["run_dir"]], entry.get("group"))})
    return study, rows


def _fmt(value: Any, spec: str = ".3f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e6:.2f} MB"


def make_study(study_dir: str | Path) -> list[Path]:
    study_dir = Path(study_dir)
    study, rows = load_study(study_dir)
    main = [r for r in rows if r["setup"] not in ("churn", "slow_links", "clients") and r["trainers"]]
    setups = [r for r in rows if r["setup"] in ("churn", "slow_links", "clients") and r["trainers"]]
    collaborative = [r for r in main if r["method"] != "alone" and r.get("lib") != "hivemind" and r["final_loss"] is not None]
    target = round(max(r["final_loss"] for r in collaborative) + 0.005, 2) if collaborative else None

    panels = 2 if setups else 1
    fig, axes = plt.subplots(panels, 3, figsize=(16, 4.6 * panels), squeeze=False)
    for row_axes, chosen, title in ((axes[0], main, "methods"), (axes[-1], setups, "setups")):
        if title == "setups" and not setups:
            break
        for r in chosen:
            color = COLORS["hivemind"] if r.get("lib") == "hivemind" else COLORS.get(r["method"], "gray")
            style = {"churn": "--", "slow_links": ":", "clients": "-."}.get(r["setup"], "-")
            label = r["label"] + (" (hivemind.Optimizer)" if r.get("lib") == "hivemind" else "")
            xs = {k: [p[k] for p in r["curve"]] for k in ("wall_s", "samples", "bytes_per_peer", "loss")}
            row_axes[0].plot(xs["wall_s"], xs["loss"], style, marker=".", color=color, label=label)
            row_axes[1].plot(xs["samples"], xs["loss"], style, marker=".", color=color, label=label)
            if r["method"] != "alone":
                pts = [(b, l) for b, l in zip(xs["bytes_per_peer"], xs["loss"]) if b > 0]
                row_axes[2].plot([b / 1e6 for b, _ in pts], [l for _, l in pts], style, marker=".", color=color,
                                 label=label)
        for ax, xlabel in zip(row_axes, ("wall time since training started (s)", "samples processed by the swarm",
                                          "bytes sent per peer (MB)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out loss (nats/byte)")
            ax.grid(alpha=0.3, which="both")
            if target is not None:
                ax.axhline(target, color="gray", lw=0.8, ls="--")
        row_axes[2].set_xscale("log")
        row_axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        row_axes[0].legend(fontsize=8)
        row_axes[0].set_title(f"{title}: loss vs wall time")
        row_axes[1].set_title(f"{title}: loss vs samples")
        row_axes[2].set_title(f"{title}: loss vs bytes sent per peer")
    cfg = study.get("config", {})
    fig.suptitle(f"collaborative-training study: char-LM (834k parameters), batch {cfg.get('batch')}, "
                 f"{cfg.get('steps')} steps per peer, DiLoCo H={cfg.get('H')}; dashed grey: target loss {target}",
                 fontsize=10)
    fig.tight_layout()
    figure = study_dir / "collab_study.png"
    fig.savefig(figure, dpi=100)
    plt.close(fig)

    reference = {r["setup"]: r for r in rows if r["method"] == "gradient_averaging" and r.get("lib") != "hivemind"}
    lines = [f"# Collaborative-training study", "", *(f"Command: `{c}`" for c in study.get("commands", [study.get("command", "")])), "",
             f"Target loss: {target} (the worst final loss of the collaborative hivesim methods, so that each reaches it).",
             "", "| run | setup | trainers | final loss | samples | wall (s) | bytes/peer | bytes/peer to target | "
             "vs gradient averaging | compute utilisation | rounds all averaged |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r["trainers"]:
            lines.append(f"| {r['label']} | {r['setup']} | 0 | — | — | — | — | — | — | — | — |")
            continue
        to_target = first_reaching(r["curve"], target, "bytes_per_peer") if target is not None else None
        ref = reference.get(r["setup"]) or reference.get(next(iter(reference), None))
        ref_bytes = first_reaching(ref["curve"], target, "bytes_per_peer") if ref and target is not None else None
        collaborative = r.get("method") != "alone"  # a lone peer sends nothing: no ratio to speak of
        ratio = f"{ref_bytes / to_target:.1f}x less" if to_target and ref_bytes and r is not ref and collaborative else "—"
        share = r["all_averaged_share"]
        lines.append(f"| {r['label']}{' (hivemind)' if r.get('lib') == 'hivemind' else ''} | {r['setup']} | {r['trainers']} | "
                     f"{_fmt(r['final_loss'])} | {r['samples']:,} | {_fmt(r['wall_s'], '.0f')} | "
                     f"{_mb(r['bytes_per_peer']) if r['method'] != 'alone' else '—'} | "
                     f"{_mb(to_target) if r['method'] != 'alone' else '—'} | {ratio} | "
                     f"{_fmt(r['utilisation'], '.0%')} | "
                     f"{_fmt(share, '.0%') if r['method'] != 'alone' else '—'} |")
    failures = [(r["label"], f) for r in rows for f in r.get("failures", [])]
    if failures:
        lines += ["", "Trainers that failed:", ""] + [f"- {label}: {f}" for label, f in failures[:20]]
    if study.get("hivemind_skipped"):
        lines += ["", f"hivemind's Optimizer was not run: {study['hivemind_skipped']}."]
    lines += ["", "Bytes for hivemind: the loopback interface's transmitted bytes over the peer count (hivemind's "
              "traffic goes through its p2p daemons; no per-peer counter).", "",
              "## What the papers report", "", PAPERS]
    table = study_dir / "collab_study.md"
    table.write_text("\n".join(lines) + "\n")
    return [figure, table]


def make_figures(run_dir: str | Path) -> list[Path]:
    """The per-run figure of ``hivesim run``: held-out loss and epoch per peer (collaborative_training's)."""
    from analysis.collaborative_training import make_figures as per_peer

    return per_peer(run_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m analysis.collab_study STUDY_DIR")
    for path in make_study(sys.argv[1]):
        print(path)
