"""The collaborative-training study: how should peers train one model together? Same model, data and samples,
one method at a time.

    python -m experiments.collab_study --out DIR [--short] [--only LABEL ...] [--hivemind-python PATH]

Model and data: ``experiments/char_lm.py`` (a 834k-parameter byte-level GPT on the standard library's sources),
batch 16 per step, AdamW (lr 3e-3) as the (inner) optimizer, float16 averaging, every peer its own shard.
Methods (the ``trainer`` role's ``method``): ``gradient_averaging`` (hivesim.Optimizer, ``target_batch_size`` =
peers x 16 x 4: an epoch every ~4 local steps), ``local_updates`` (the same with ``use_local_updates``),
``diloco`` (hivesim.DiLoCoOptimizer, ``num_inner_steps`` H, outer SGD lr 0.7, Nesterov momentum 0.9),
``diloco_streaming`` (the same, 4 fragments), ``alone`` (one peer, both cores, all the samples: the baseline),
and **hivemind's own** ``hivemind.Optimizer`` with gradient averaging (one process per peer, from the venv named
by ``--hivemind-python`` / ``HIVEMIND_PYTHON``, through ``experiments/collab_peer.py``; skipped, and said so,
without one).

Runs (``topologies/study_*.yaml``, each through ``hivesim run`` with overrides):

* full: ``baseline`` (1 peer, 8 x 1,920 samples); ``n8`` for each method (8 peers, 1,920 samples = 120 steps each:
  15,360 in all); ``churn`` (a third of the 8 trainers killed abruptly at 20 s, three newcomers at 25 s download the state
  and train half a budget each), ``slow_links`` (3 of 8 peers on 10 Mbit/s links, 150 ms from everyone) and
  ``clients`` (4 of 8 trainers in client mode) for gradient averaging and DiLoCo; hivemind with 8 peers;
  about 20 minutes on the 2-core VM;
* ``--short`` (CI): one run, ``topologies/study_short.yaml``, where four groups of 4 peers (one per method) and one
  peer alone train side by side for 40 steps per peer (160 per method), and hivemind with 4 peers: ~3 minutes.

Writes ``DIR/study.json`` (what ran: label, method, setup, results folder, peer group), the results folders under
``DIR/runs/`` (hivemind's in the same layout: ``samples.jsonl`` with ``eval``/``epoch``/``trainer_done`` samples),
then runs ``python -m analysis.collab_study DIR``: ``DIR/collab_study.png`` and ``DIR/collab_study.md``.

This module is also the workload of those topologies: ``ROLE`` is the trainer with per-group overrides
(``by_group: {group: {param: value}}``, e.g. another ``method`` and ``run_id``, ``optimizer_opts`` merged, and a
``shard_offset`` added to the peer's index), ``summarize`` gives per-method headline numbers, ``finished`` ends a
run once every live trainer reached its sample budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from hivesim.roles.trainer import TrainerRole

ROOT = Path(__file__).resolve().parents[1]


class StudyTrainer(TrainerRole):
    """The trainer role, with ``by_group`` overrides: peers of group ``g`` get ``by_group[g]`` over the params."""

    def __init__(self, peer: Any, by_group: dict[str, dict[str, Any]] | None = None, shard_offset: int = 0,
                 **params: Any) -> None:
        group = getattr(peer, "name", "").split(".", 1)[0]
        extra = dict((by_group or {}).get(group) or {})
        if "optimizer_opts" in extra:
            extra["optimizer_opts"] = {**(params.get("optimizer_opts") or {}), **extra["optimizer_opts"]}
        params.update(extra)
        shard_offset = int(params.pop("shard_offset", shard_offset))
        if params.get("shard") is None and shard_offset:
            tail = getattr(peer, "name", "").rsplit(".", 1)[-1]
            if tail.isdigit():
                params["shard"] = (shard_offset + int(tail)) % int(params.get("num_shards", 4))
        super().__init__(peer, **params)


ROLE = StudyTrainer


# ------------------------------------------------------------------------------------------------ the workload side
def _by_peer(samples: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for s in sorted(samples, key=lambda s: s["t"]):
        out[s["peer"]][s["name"]].append(s)
    return out


def summarize(run: Any) -> dict[str, Any]:
    """Per peer group: method, trainers, samples, final held-out loss, bytes sent per peer, utilisation."""
    samples = run.samples if hasattr(run, "samples") else run["samples"]
    by_peer = _by_peer(samples)
    groups: dict[str, list[str]] = defaultdict(list)
    for peer, named in by_peer.items():
        if named.get("eval"):
            groups[peer.split(".", 1)[0]].append(peer)
    out: dict[str, Any] = {}
    for group, peers in sorted(groups.items()):
        last = {p: (by_peer[p]["trainer_done"] or by_peer[p]["eval"])[-1] for p in peers}
        evals = [by_peer[p]["eval"] for p in peers]
        initial = [e[0]["value"] for e in evals if e[0].get("samples_total", 0) == 0]
        finals = [by_peer[p]["eval"][-1]["value"] for p in peers if by_peer[p]["trainer_done"]]
        compute = sum(s.get("compute_s", 0.0) for s in last.values())
        wall = sum(s.get("wall_s", 0.0) for s in last.values())
        out[group] = {
            "method": next((s.get("method") for s in last.values() if s.get("method")), None),
            "trainers": len(peers),
            "finished": sum(bool(by_peer[p]["trainer_done"]) for p in peers),
            "samples": sum(s.get("samples_total", 0) for s in last.values()),
            "epochs_max": max((s["value"] for p in peers for s in by_peer[p]["epoch"]), default=0),
            "initial_test_loss": round(sum(initial) / len(initial), 4) if initial else None,
            "final_test_loss": round(sum(finals) / len(finals), 4) if finals else None,
            "bytes_sent_per_peer": round(sum(s.get("bytes_sent_total", 0) for s in last.values()) / len(peers)),
            "compute_utilisation": round(compute / wall, 3) if wall > 0 else None,
            "wall_s_max": round(max(s.get("wall_s", 0.0) for s in last.values()), 1),
            "state_downloads": sum(s.get("state_downloads", 0) for s in last.values()),
        }
        if out[group]["initial_test_loss"] is not None and out[group]["final_test_loss"] is not None:
            out[group]["loss_went_down"] = out[group]["final_test_loss"] < out[group]["initial_test_loss"]
    return out


def finished(run: Any, alive: list[str]) -> bool:
    """Every live trainer reached its budget (or stopped otherwise): nothing left to measure."""
    done = {s["peer"] for s in run.samples if s["name"] == "trainer_done"}
    return bool(alive) and all(p in done for p in alive)


def headline(run: Any) -> str:
    evals = run.named("eval")[-8:]
    if not evals:
        return "training: starting"
    loss = sum(s["value"] for s in evals) / len(evals)
    return f"held-out loss {loss:.3f}  samples/peer {max(s.get('samples_total', 0) for s in evals)}"


# ------------------------------------------------------------------------------------------------ the study
FULL = dict(peers=8, batch=16, steps=120, H=20, eval_every=320, short=False)
SHORT = dict(peers=4, batch=16, steps=40, H=10, eval_every=160, short=True)


def plan(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{label, method, setup, topology, overrides, group}]``: what the study runs."""
    n, b, steps, h = cfg["peers"], cfg["batch"], cfg["steps"], cfg["H"]
    budget = b * steps
    common = [f"workload.params.max_samples={budget}", f"workload.params.num_inner_steps={h}",
              f"workload.params.target_batch_size={n * b * 4}", f"workload.params.eval_every_samples={cfg['eval_every']}"]
    if cfg["short"]:
        entries = [{"label": m, "method": m, "setup": f"{n} peers", "topology": "topologies/study_short.yaml",
                    "overrides": [], "group": g}
                   for g, m in (("ga", "gradient_averaging"), ("lu", "local_updates"), ("dl", "diloco"),
                                ("ds", "diloco_streaming"), ("alone", "alone"))]
        entries[-1]["setup"] = "1 peer alone"
        return entries
    entries = [{"label": "alone", "method": "alone", "setup": "1 peer alone", "topology": "topologies/study_baseline.yaml",
                "overrides": [f"workload.params.max_samples={budget * n}", f"workload.params.target_batch_size={b * 20}",
                              f"workload.params.eval_every_samples={budget * n // 20}"]}]
    for m in ("gradient_averaging", "local_updates", "diloco", "diloco_streaming"):
        entries.append({"label": m, "method": m, "setup": f"{n} peers", "topology": "topologies/study_n8.yaml",
                        "overrides": [*common, f"workload.params.method={m}", f"workload.params.run_id={m}"]})
    for setup, topology in (("churn", "study_churn"), ("slow_links", "study_slow_links"), ("clients", "study_clients")):
        for m in ("gradient_averaging", "diloco"):
            overrides = [*common, f"workload.params.method={m}", f"workload.params.run_id={m}_{setup}"]
            entries.append({"label": f"{m} {setup}", "method": m, "setup": setup, "topology": f"topologies/{topology}.yaml",
                            "overrides": overrides})
    return entries


def run_topology(topology: str, overrides: list[str], results: Path, timeout: float) -> Path:
    before = set(results.iterdir()) if results.exists() else set()
    out = subprocess.run([sys.executable, "-m", "hivesim.cli", "run", topology, *overrides, "--quiet",
                          "--results-dir", str(results)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    new = sorted(set(results.iterdir()) - before)
    if out.returncode != 0 or not new:
        raise RuntimeError(f"hivesim run {topology} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return new[-1]


# ------------------------------------------------------------------------------------------------ hivemind's side
def run_peers(lib: str, python: str, cfg: dict[str, Any], run_dir: Path, time_limit: float) -> dict[str, Any]:
    """``cfg['peers']`` processes of ``experiments/collab_peer.py`` (each the leader of its own process group,
    killed as a whole at the end: hivemind starts helper processes); writes ``run_dir/samples.jsonl``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n, b = cfg["peers"], cfg["batch"]
    procs: list[subprocess.Popen] = []
    lines: list[dict[str, Any]] = []
    lock = threading.Lock()
    address: list[str] = []
    got_address = threading.Event()
    ready: set[int] = set()

    def read(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            with lock:
                if "address" in obj:
                    address.extend(obj["address"])
                    got_address.set()
                elif "ready" in obj:
                    ready.add(i)
                elif "sample" in obj:
                    lines.append(obj["sample"])

    def spawn(i: int) -> None:
        cmd = [python, str(ROOT / "experiments" / "collab_peer.py"), "--lib", lib, "--index", str(i), "--peers", str(n),
               "--run-id", f"study_{lib}_{os.getpid()}", "--batch", str(b), "--target-batch-size", str(n * b * 4),
               "--max-samples", str(b * cfg["steps"]), "--eval-every-samples", str(cfg["eval_every"]),
               "--time-limit", str(time_limit), "--initial-peers", *address]
        log = open(run_dir / f"peer{i}.log", "w")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True, cwd=ROOT)
        log.close()
        procs.append(proc)
        threading.Thread(target=read, args=(i, proc), daemon=True).start()

    started = time.time()
    result: dict[str, Any] = {"lib": lib, "peers": n, "errors": []}
    try:
        spawn(0)
        if not got_address.wait(120):
            result["errors"].append("peer 0 printed no address")
            return result
        for i in range(1, n):
            spawn(i)
        deadline = time.monotonic() + 180
        while len(ready) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        if len(ready) < n:
            result["errors"].append(f"only {len(ready)} of {n} peers got ready")
            return result
        time.sleep(8.0)  # the progress trackers see each other before anyone trains (see benchmarks/bench_optimizer.py)
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        deadline = time.monotonic() + time_limit + 60
        while time.monotonic() < deadline:
            with lock:
                done = {s["peer"] for s in lines if s["name"] == "trainer_done"}
            if len(done) >= n:
                break
            time.sleep(0.5)
    finally:
        for proc in procs:
            try:
                proc.stdin.write("exit\n")
                proc.stdin.flush()
            except (OSError, ValueError):
                pass
        time.sleep(2.0)
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        with open(run_dir / "samples.jsonl", "w") as f:
            for s in sorted(lines, key=lambda s: s["t"]):
                f.write(json.dumps(s) + "\n")
        (run_dir / "events.jsonl").write_text("")
        result["wall_time_s"] = round(time.time() - started, 1)
        result["workload"] = summarize({"samples": lines})
        (run_dir / "summary.json").write_text(json.dumps({"name": f"{lib}_{n}", **result}, indent=1))
    return result


# ------------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the study's folder (created)")
    parser.add_argument("--short", action="store_true", help="the CI version: 4 peers, 40 steps each, ~3 minutes")
    parser.add_argument("--only", nargs="*", help="run only these labels (and hivemind if listed)")
    parser.add_argument("--hivemind-python", default=os.environ.get("HIVEMIND_PYTHON"))
    parser.add_argument("--hivemind-time-limit", type=float, default=None,
                        help="seconds hivemind's peers may train (default: 240, --short 90)")
    parser.add_argument("--run-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    cfg = SHORT if args.short else FULL
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    index_path = out / "study.json"
    study = json.loads(index_path.read_text()) if index_path.exists() and args.only else {"runs": []}
    command = ("python -m experiments.collab_study --out " + str(args.out) + (" --short" if args.short else "")
               + ("" if not args.only else " --only " + " ".join(f"'{x}'" if " " in x else x for x in args.only)))
    # a study filled in by several invocations (--only) lists each of them
    study.update(config=cfg, commands=[*study.get("commands", [study["command"]] if "command" in study else []), command])
    study.pop("command", None)
    entries = [e for e in plan(cfg) if not args.only or e["label"] in args.only]
    done_dirs: dict[tuple[str, tuple[str, ...]], Path] = {}
    for entry in entries:
        key = (entry["topology"], tuple(entry["overrides"]))
        t0 = time.monotonic()
        if key not in done_dirs:
            print(f"collab_study: {entry['label']} ({entry['setup']}): hivesim run {entry['topology']}", flush=True)
            done_dirs[key] = run_topology(entry["topology"], entry["overrides"], out / "runs", args.run_timeout)
        run_dir = done_dirs[key]
        record = {k: entry[k] for k in ("label", "method", "setup")}
        record.update(lib="hivesim", run_dir=str(run_dir.relative_to(out)), group=entry.get("group"),
                      seconds=round(time.monotonic() - t0, 1))
        study["runs"] = [r for r in study["runs"] if r["label"] != entry["label"]] + [record]
        index_path.write_text(json.dumps(study, indent=1))
    if not args.only or "hivemind" in args.only:
        label = "hivemind"
        if not args.hivemind_python:
            print("collab_study: hivemind skipped: no --hivemind-python / HIVEMIND_PYTHON", flush=True)
            study["hivemind_skipped"] = "no --hivemind-python / HIVEMIND_PYTHON"
        else:
            print(f"collab_study: hivemind's Optimizer, {cfg['peers']} processes", flush=True)
            t0 = time.monotonic()
            run_dir = out / "runs" / f"hivemind_{cfg['peers']}"
            shutil.rmtree(run_dir, ignore_errors=True)
            limit = args.hivemind_time_limit or (60.0 if args.short else 240.0)
            result = run_peers("hivemind", args.hivemind_python, cfg, run_dir, limit)
            study["runs"] = [r for r in study["runs"] if r["label"] != label] + [{
                "label": label, "method": "gradient_averaging", "setup": f"{cfg['peers']} peers", "lib": "hivemind",
                "run_dir": str(run_dir.relative_to(out)), "group": None, "seconds": round(time.monotonic() - t0, 1),
                "errors": result["errors"], "time_limit_s": limit}]
        index_path.write_text(json.dumps(study, indent=1))
    return run_analysis("analysis.collab_study", out)


def run_analysis(module: str, out: Path) -> int:
    """Draw a study's figures with its ``analysis`` module, in a subprocess (experiments do not import
    analysis); prints what it printed; 0, or 1 if it failed."""
    figures = subprocess.run([sys.executable, "-m", module, str(out)], cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(figures.stdout)
    if figures.returncode != 0:
        sys.stderr.write(figures.stderr[-3000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
