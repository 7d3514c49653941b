"""Figures of the Moshpit averaging study: MSE vs round (semilog, one line per method) and a table of
rounds to 1e-9 next to the paper's numbers; ``combine`` draws several runs (N, p) side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis.common import load_run  # noqa: E402
from experiments.moshpit_averaging import curves  # noqa: E402

COLORS = {"moshpit": "tab:red", "random": "tab:blue", "allreduce": "tab:green"}
LABELS = {"moshpit": "Moshpit (grid)", "random": "random groups", "allreduce": "all-reduce (needs everyone)"}
FLOOR = 1e-18  # exact averages (MSE 0) are drawn here on the log axis

# papers.md: the authors' simulation. MSE after rounds 0..4 at small scale, rounds-to-1e-9 in Table 1.
PAPER_SMALL = {
    (16, 4, 2, 0.0): [0.93, 0.18, 1e-16],
    (16, 4, 2, 0.05): [0.93, 0.24, 0.023, 0.0042, 7e-4],
    (64, 8, 2, 0.05): [None, 0.16, 0.015, 0.0022],
}
PAPER_TABLE = {  # (N, p): {method: rounds to 1e-9}
    (512, 0.0): {"allreduce": 1.0, "random": 6.1, "moshpit": 8.2},
    (768, 0.005): {"allreduce": 28.7, "random": 6.6, "moshpit": 6.6},
    (1024, 0.0): {"allreduce": 1.0, "random": 6.2, "moshpit": 2.0},
    (1024, 0.005): {"allreduce": 42.6, "random": 6.7, "moshpit": 5.5},
    (1024, 0.01): {"allreduce": 50.0, "random": 6.9, "moshpit": 5.8},
}


def _describe(summary: dict[str, Any]) -> tuple[int, int, int, float]:
    work = summary.get("workload", {})
    return int(work.get("n_peers", 0)), int(work.get("side", 0)), int(work.get("dims", 0)), float(work.get("p", 0.0))


def _plot(ax: Any, result: dict[str, dict[str, Any]], title: str, paper: list | None) -> None:
    for method, data in result.items():
        mse = np.maximum(np.array(data["mse"], dtype=float), FLOOR)
        ax.semilogy(data["rounds"], mse, marker="o", color=COLORS.get(method), label=LABELS.get(method, method))
    if paper:
        xs = [i for i, v in enumerate(paper) if v is not None]
        ax.semilogy(xs, [paper[i] for i in xs], ls=":", marker="x", color="black", label="paper's simulation (Moshpit)")
    ax.axhline(1e-9, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("round")
    ax.set_ylabel("mean squared distance to the mean")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")


HEADER = ["| run | N | grid | p | method | MSE after rounds 1, 2, 3 | rounds to 1e-9 (hivesim, real peers) | paper (Table 1, N>=512) |",
          "|---|---|---|---|---|---|---|---|"]


def table_rows(result: dict[str, dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    n, side, dims, p = _describe(summary)
    paper = PAPER_TABLE.get((n, p), {})
    rows = []
    for method, data in result.items():
        got = data["rounds_to_1e-9"]
        shown = f"{got:g}" if got is not None else f">{data['rounds'][-1]} ({data['reached_1e-9']}/{data['restarts']} restarts reached it)"
        mse = ", ".join(f"{v:.2g}" for v in data["mse"][1:4])
        rows.append(f"| {summary.get('name', '')} | {n} | {'x'.join([str(side)] * dims)} | {p:g} | {LABELS.get(method, method)} "
                    f"| {mse} | {shown} | {paper.get(method, '-')} |")
    return rows


def make_figures(run_dir: str | Path) -> list[Path]:
    run = load_run(run_dir)
    result = curves(run["samples"])
    if not result:
        return []
    n, side, dims, p = _describe(run["summary"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _plot(ax, result, f"N={n} on {'x'.join([str(side)] * dims)}, p={p:g} (real peers, {run['summary'].get('name', '')})",
          PAPER_SMALL.get((n, side, dims, p)))
    fig.tight_layout()
    path = Path(run_dir) / "moshpit_averaging.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    table = HEADER + table_rows(result, run["summary"])
    (Path(run_dir) / "moshpit_table.md").write_text("\n".join(table) + "\n")
    return [path]


def combine(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, str]:
    """One panel per run and a combined markdown table; returns (figure path, table text)."""
    runs = [load_run(d) for d in run_dirs]
    cols = min(3, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    table = list(HEADER)
    for ax, run in zip(axes.flat, runs):
        result = curves(run["samples"])
        n, side, dims, p = _describe(run["summary"])
        name = run["summary"].get("name", "")
        _plot(ax, result, f"{name}: N={n}, {'x'.join([str(side)] * dims)}, p={p:g}", PAPER_SMALL.get((n, side, dims, p)))
        table += table_rows(result, run["summary"])
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, "\n".join(table) + "\n"


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m analysis.moshpit_averaging OUT.png RUN_DIR [RUN_DIR ...]")
    figure, text = combine(sys.argv[2:], sys.argv[1])
    print(text)
    print(f"figure: {figure}")
    print(json.dumps({"runs": sys.argv[2:]}))
