"""Run the Moshpit averaging study over several sizes and failure rates, then draw them side by side.

    python -m experiments.moshpit_sweep [--quick] [--only NAME ...] [--out docs]

Each entry is one ``hivesim run`` of a ``topologies/moshpit_*.yaml`` file with overrides; the combined
figure (``moshpit_averaging.png``) and table (``moshpit_table.md``) go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis.moshpit_averaging import combine
from hivesim.sim.runner import run

SWEEP: list[tuple[str, str, list[str]]] = [
    ("16_p0", "topologies/moshpit_16.yaml", []),
    ("16_p0.01", "topologies/moshpit_16.yaml", ["workload.params.p=0.01"]),
    ("16_p0.05", "topologies/moshpit_16.yaml", ["workload.params.p=0.05", "workload.params.rounds=5", "duration=72"]),
    ("64_8x8_p0", "topologies/moshpit_64.yaml", []),
    ("64_4x4x4_p0", "topologies/moshpit_64.yaml", ["workload.params.side=4", "workload.params.dims=3"]),
    ("64_8x8_p0.05", "topologies/moshpit_64.yaml", ["workload.params.p=0.05"]),
    ("64_churn", "topologies/moshpit_churn.yaml", []),
    ("64_hetero", "topologies/moshpit_hetero.yaml", []),
    ("256_16x16_p0", "topologies/moshpit_256.yaml", []),
    ("256_16x16_p0.01", "topologies/moshpit_256.yaml", ["workload.params.p=0.01"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="names of sweep entries to run (default: all)")
    parser.add_argument("--out", default="docs", help="where the combined figure and table go")
    parser.add_argument("--results-dir", default="results/moshpit_sweep")
    parser.add_argument("--runs", nargs="*", help="combine these existing run folders instead of running")
    args = parser.parse_args()
    if args.runs:
        dirs = [Path(d) for d in args.runs]
    else:
        dirs = []
        for name, topology, overrides in SWEEP:
            if args.only and name not in args.only:
                continue
            print(f"== {name}: {topology} {' '.join(overrides)}", flush=True)
            dirs.append(run(topology, [f"name=moshpit_{name}", *overrides], results_dir=args.results_dir))
    out = Path(args.out)
    figure, table = combine(dirs, out / "moshpit_averaging.png")
    (out / "moshpit_table.md").write_text(table)
    print(table)
    print(json.dumps({"figure": str(figure), "runs": [str(d) for d in dirs]}))


if __name__ == "__main__":
    main()
