"""The Byzantine study: can peers train together when some of them lie about their gradients?

    python -m experiments.byzantine_study --out DIR [--short] [--only LABEL ...]

Setup (``topologies/byzantine.yaml``, scaled from Gorbunov et al.'s BTARD experiments to a 2-core box): 16
trainers average gradients with :class:`hivesim.Optimizer` (one step together per 4 local batches of 32, Adam) on
scikit-learn's digits (an MLP; 400 images held out); ``b`` of them are Byzantine: they run the honest protocol
but corrupt the gradients they contribute (:mod:`hivesim.roles.attacks`): ``sign_flip`` (x -1000),
``label_flip``, ``random_direction`` (100x the honest norm) and ``alie`` ("a little is enough"). Every trainer
reduces its parts of a round with the same rule: ``mean`` (hivemind's), ``centered_clip`` or ``trimmed_mean``
(:mod:`hivesim.averaging.robust`).

Runs:

* full: for each rule, a clean run (b = 0) and every attack with b = 3 and b = 7 (27 runs, about 40 minutes);
* ``--short`` (CI): 8 trainers, clean and ``sign_flip`` with b = 2, under ``mean`` and ``centered_clip`` (3 runs).

Writes ``DIR/study.json`` (label, attack, attackers, aggregation, results folder) and the results folders under
``DIR/runs/``, then runs ``python -m analysis.byzantine_study DIR``: ``DIR/byzantine_study.png`` (held-out
accuracy of the honest trainers over epochs, one panel per attack) and ``DIR/byzantine_study.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from experiments.collab_study import run_analysis, run_topology

ATTACKS = ("sign_flip", "label_flip", "random_direction", "alie")
RULES = ("mean", "centered_clip", "trimmed_mean")
STEPS_PER_EPOCH = 4  # local batches per peer between two steps together
FULL = dict(peers=16, attackers=(3, 7), attacks=ATTACKS, rules=RULES, steps=120, short=False)
SHORT = dict(peers=8, attackers=(2,), attacks=("sign_flip",), rules=("mean", "centered_clip"), steps=60, short=True)


def plan(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{label, attack, attackers, aggregation, overrides}]``: what the study runs."""
    n, batch = cfg["peers"], 32
    entries = []
    for rule in cfg["rules"]:
        cases = [(None, 0)] + [(a, b) for a in cfg["attacks"] for b in cfg["attackers"]]
        if cfg["short"] and rule != "mean":
            cases = [c for c in cases if c[0] is not None]  # the short study's clean run is the mean's
        for attack, b in cases:
            label = f"{rule} clean" if attack is None else f"{rule} {attack} b={b}"
            run_id = label.replace(" ", "_").replace("=", "")
            overrides = [
                f"groups.honest.count={n - b}", f"groups.byz.count={b}",
                f"workload.params.aggregation={rule}", f"workload.params.run_id={run_id}",
                f"workload.params.num_shards={n}", f"workload.params.target_batch_size={n * batch * STEPS_PER_EPOCH}",
                f"workload.params.max_samples={cfg['steps'] * batch}",
                f"workload.params.by_group.byz.attack={attack or 'sign_flip'}",
            ]
            if attack == "alie":
                overrides.append(f"workload.params.by_group.byz.attack_opts.num_peers={n}")
                overrides.append(f"workload.params.by_group.byz.attack_opts.num_byzantine={b}")
            entries.append({"label": label, "attack": attack, "attackers": b, "aggregation": rule,
                            "overrides": overrides})
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the study's folder (created)")
    parser.add_argument("--short", action="store_true", help="the CI version: 8 peers, 3 runs, a few minutes")
    parser.add_argument("--only", nargs="*", help="run only these labels (e.g. 'centered_clip alie b=7')")
    parser.add_argument("--run-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    cfg = SHORT if args.short else FULL
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    index_path = out / "study.json"
    study = json.loads(index_path.read_text()) if index_path.exists() and args.only else {"runs": []}
    study.update(config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                 command="python -m experiments.byzantine_study --out " + str(args.out) + (" --short" if args.short else ""))
    entries = [e for e in plan(cfg) if not args.only or e["label"] in args.only]
    if args.only and not entries:
        print(f"byzantine_study: no run is labelled {args.only}; labels: {[e['label'] for e in plan(cfg)]}")
        return 2
    for i, entry in enumerate(entries, 1):
        print(f"byzantine_study: [{i}/{len(entries)}] {entry['label']}", flush=True)
        t0 = time.monotonic()
        run_dir = run_topology("topologies/byzantine.yaml", entry["overrides"], out / "runs", args.run_timeout)
        record = {k: entry[k] for k in ("label", "attack", "attackers", "aggregation")}
        record.update(run_dir=str(run_dir.relative_to(out)), seconds=round(time.monotonic() - t0, 1))
        study["runs"] = [r for r in study["runs"] if r["label"] != entry["label"]] + [record]
        index_path.write_text(json.dumps(study, indent=1))
    return run_analysis("analysis.byzantine_study", out)


if __name__ == "__main__":
    sys.exit(main())
