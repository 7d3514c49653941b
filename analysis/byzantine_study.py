"""Figure and table of the Byzantine study (``experiments/byzantine_study.py``).

    python -m analysis.byzantine_study DIR      # DIR/study.json -> DIR/byzantine_study.png, DIR/byzantine_study.md

Reads only results folders: ``DIR/study.json`` lists the runs (label, attack, attackers, aggregation, folder);
each folder's ``samples.jsonl`` holds the trainers' ``eval`` samples (held-out loss as the value, ``accuracy``,
``epoch``). Only the *honest* trainers (group ``honest``) are scored. A run's curve is their mean held-out
accuracy per epoch (every honest peer holds the same parameters right after an epoch); its final numbers are
the means over the honest trainers of their last evaluation.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis.common import read_jsonl  # noqa: E402

COLORS = {"mean": "tab:red", "centered_clip": "tab:blue", "trimmed_mean": "tab:green", "median": "tab:purple"}


def run_data(run_dir: Path) -> dict[str, Any]:
    """Curve (epoch -> mean accuracy and loss of the honest trainers) and final numbers of one run."""
    evals = [s for s in read_jsonl(run_dir / "samples.jsonl")
             if s["name"] == "eval" and s["peer"].split(".", 1)[0] == "honest"]
    by_epoch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    last: dict[str, dict[str, Any]] = {}
    for s in sorted(evals, key=lambda s: s["t"]):
        by_epoch[int(s.get("epoch", 0))].append(s)
        last[s["peer"]] = s
    curve = [{"epoch": e, "accuracy": sum(s.get("accuracy", 0.0) for s in ss) / len(ss),
              "loss": sum(s["value"] for s in ss) / len(ss)} for e, ss in sorted(by_epoch.items())]
    finals = list(last.values())
    return {
        "curve": curve,
        "honest": len(last),
        "final_accuracy": sum(s.get("accuracy", 0.0) for s in finals) / len(finals) if finals else None,
        "final_loss": sum(s["value"] for s in finals) / len(finals) if finals else None,
        "epochs": max(by_epoch, default=0),
    }


def load_study(study_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    study = json.loads((study_dir / "study.json").read_text())
    rows = []
    for run in study["runs"]:
        rows.append({**run, **run_data(study_dir / run["run_dir"])})
    return study, rows


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def make_study(study_dir: str | Path) -> list[Path]:
    study_dir = Path(study_dir)
    study, rows = load_study(study_dir)
    attacks = sorted({r["attack"] for r in rows if r["attack"]}, key=lambda a: ("sign_flip", "label_flip",
                     "random_direction", "alie").index(a) if a in ("sign_flip", "label_flip", "random_direction",
                                                                   "alie") else 9)
    counts = sorted({r["attackers"] for r in rows if r["attack"]})
    styles = ["-", "--", ":"]
    fig, axes = plt.subplots(1, max(1, len(attacks)), figsize=(4.2 * max(1, len(attacks)), 3.6), squeeze=False,
                             sharey=True)
    for ax, attack in zip(axes[0], attacks or [None]):
        for r in rows:
            if r["attack"] is None:  # the clean run of each rule, in every panel
                pts = r["curve"]
                ax.plot([p["epoch"] for p in pts], [p["accuracy"] for p in pts], color=COLORS.get(r["aggregation"]),
                        alpha=0.35, lw=3, label=f"{r['aggregation']}, no attackers")
            elif r["attack"] == attack:
                pts = r["curve"]
                ax.plot([p["epoch"] for p in pts], [p["accuracy"] for p in pts], color=COLORS.get(r["aggregation"]),
                        ls=styles[counts.index(r["attackers"]) % len(styles)],
                        label=f"{r['aggregation']}, {r['attackers']} of {r['honest'] + r['attackers']} Byzantine")
        ax.set_title(attack or "no attack")
        ax.set_xlabel("epoch (optimizer steps together)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (honest peers)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    seen = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(4, len(seen)), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.05 * ((len(seen) - 1) // 4)))
    fig.suptitle("Byzantine trainers vs aggregation rule (digits MLP, gradient averaging)")
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(seen) - 1) // 4), 1, 1))
    png = study_dir / "byzantine_study.png"
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)

    lines = [f"Command: `{study.get('command', '')}`", "",
             f"![byzantine_study]({png.name})", "",
             "| attack | Byzantine | aggregation | final accuracy | final loss | epochs |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["attack"] or "", r["attackers"], r["aggregation"])):
        lines.append(f"| {r['attack'] or 'none'} | {r['attackers']} of {r['honest'] + r['attackers']} | "
                     f"{r['aggregation']} | {_fmt(r['final_accuracy'])} | {_fmt(r['final_loss'])} | {r['epochs']} |")
    md = study_dir / "byzantine_study.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return [png, md]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m analysis.byzantine_study DIR", file=sys.stderr)
        return 2
    for path in make_study(args[0]):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
