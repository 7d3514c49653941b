"""Collaborative training: hivesim's ``Optimizer``, or hivemind's, on the same job.

    python benchmarks/bench_optimizer.py [--peers 8 --epochs 10 --batch 32 --matchmaking-time 3 --timeout 30] [--json]
    python benchmarks/bench_optimizer.py --against hivemind [--hivemind-python PATH]   # both, side by side
    python benchmarks/bench_optimizer.py --only hivemind [--hivemind-python PATH]      # hivemind alone

``--hivemind-python`` defaults to the environment variable ``HIVEMIND_PYTHON``; a Python that has hivemind:

    python3 -m venv hm && hm/bin/pip install torch==2.13.0 && hm/bin/pip install hivemind==1.1.12 torch==2.13.0 scikit-learn

The job (``optimizer_job.py``): ``--peers`` processes, one per peer, train an MLP 64-256-256-10 on scikit-learn's
digits, each on its own shard of the training set, with ``Optimizer(dht, run_id, target_batch_size=peers * 4 *
batch, batch_size_per_step=batch, optimizer=Adam(lr=1e-3), matchmaking_time, averaging_timeout, verbose=False)``
until ``opt.local_epoch >= --epochs``: one epoch is about four steps per peer, so the time goes mostly to the
collaboration itself (progress tracking, matchmaking, all-reduce), which is what this measures.
``optimizer_peer.py`` is the peer, the same file for both libraries (hivesim's ``Optimizer`` has hivemind's API);
its docstring says what a peer measures and how "averaged at this epoch" is decided.

Peer 0 starts first and prints its address; peers 1..N-1 then start together and join it. Each makes
``--warmup-steps`` unmeasured steps (a peer that has never stepped reports no progress, and hivemind's
progress trackers do not see it) and says it is ready; once all are and ``--settle`` s more have passed (the
trackers look again), the driver sends ``go`` to every peer at once. Without that, with steps this short
(about a millisecond), every hivemind peer ran its first epochs alone before its tracker saw the others.
``--step-time`` pads each forward/backward to that many seconds by sleeping: the regime of a slower model,
where an epoch takes seconds of compute rather than milliseconds. A peer that reached the last epoch stays
up, idle, until every peer has (the end of a real job: a peer still behind then must load the state from
idle peers); with ``--keep-training`` it goes on training, unmeasured, as in a swarm that goes on.

Each peer runs in a process group of its own, killed as a whole at the end or on a timeout (hivemind's DHT
starts child processes and p2p daemons). This file imports neither library, nor torch; the hivesim side runs
with this Python, the hivemind side with ``--hivemind-python``; the two sides run one after the other.

Printed per library:

* swarm samples/s: the samples all peers processed / the wall time from the first step of any peer until
  the last peer reached the last epoch (if some peer never did: until the last peer stopped, at the latest
  ``--time-limit`` s after go);
* epoch transition overhead: per epoch, its wall time (from the moment the last peer reached the previous
  epoch, or from the first step, until the last peer reached this one) minus the forward/backward seconds
  of the slowest peer in it, floored at 0 (the last peer may reach several epochs at once by loading the
  state: those after the first take no wall time, while the compute that other peers spent in them
  happened earlier); mean and median over the epochs;
* averaged: the share of epochs in which every peer that reached the epoch averaged its gradients with
  others for it (the peer's definition), with the mean group size where the library tells it; and,
  library-neutral, how far apart the peers' parameters were right after each epoch (the largest distance of
  a peer's parameters from the peers' mean, relative to the mean's norm, estimated from 8 random
  projections): the share of epochs below 1e-5, the median, and after the last epoch;
* held-out loss and accuracy after training (mean over peers; with ``--keep-training`` a peer that loads the
  state at the end gets the others' later epochs, so the loss is not comparable); RSS per peer (own peak: mean and max;
  process tree incl. helper processes: mean);

and with ``--against hivemind`` the ratios: samples/s hivesim / hivemind, overhead hivemind / hivesim.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

IN_SYNC = 1e-5  # relative parameter spread below which the peers count as holding the same model
HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "optimizer_peer.py")
SETUP = ("python3 -m venv hm && hm/bin/pip install torch==2.13.0 && "
         "hm/bin/pip install hivemind==1.1.12 torch==2.13.0 scikit-learn")


# ------------------------------------------------------------------------------------------------ running a swarm
class Swarm:
    """The peers of one library, each the leader of a process group of its own (a new session: a group can't
    be joined from another session), so that one ``killpg`` per peer ends it with its helper processes."""

    def __init__(self, python: str, lib: str, args: argparse.Namespace, log_dir: str) -> None:
        self.python, self.lib, self.args, self.log_dir = python, lib, args, log_dir
        self.procs: list[subprocess.Popen] = []
        self.lines: queue.Queue = queue.Queue()  # (index, parsed line or None at EOF)

    def command(self, index: int, initial: list[str]) -> list[str]:
        a = self.args
        cmd = [self.python, PEER, "--lib", self.lib, "--index", str(index), "--peers", str(a.peers),
               "--run-id", f"bench_{self.lib}_{os.getpid()}", "--epochs", str(a.epochs), "--batch", str(a.batch),
               "--matchmaking-time", str(a.matchmaking_time), "--timeout", str(a.timeout),
               "--time-limit", str(a.time_limit), "--step-time", str(a.step_time), "--warmup-steps", str(a.warmup_steps)]
        if a.keep_training:
            cmd.append("--keep-training")
        if a.peer_debug:
            cmd.append("--debug")
        if initial:
            cmd += ["--initial-peers", *initial]
        return cmd

    def spawn(self, index: int, initial: list[str]) -> None:
        stderr = open(os.path.join(self.log_dir, f"{self.lib}-{index}.log"), "w")
        proc = subprocess.Popen(self.command(index, initial), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, start_new_session=True)
        stderr.close()
        self.procs.append(proc)
        threading.Thread(target=self._read, args=(index, proc), daemon=True).start()

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                self.lines.put((index, json.loads(line)))
            except ValueError:
                pass  # a stray print of a library
        self.lines.put((index, None))

    def expect(self, key: str, count: int, timeout: float) -> dict[int, Any]:
        """Wait for ``count`` lines carrying ``key`` (one per peer); a peer whose stdout closes counts as failed."""
        got: dict[int, Any] = {}
        closed: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(got) + len(closed - set(got)) < count:
            try:
                index, obj = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if obj is None:
                closed.add(index)
            elif key in obj:
                got[index] = obj[key]
        return got

    def send(self, text: str) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write(text + "\n")
                proc.stdin.flush()
            except (OSError, ValueError):
                pass

    def stop(self, grace: float = 20.0) -> None:
        self.send("exit")
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # what is left: hung peers, hivemind's DHT processes and daemons
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def tail(self, index: int, chars: int = 2000) -> str:
        try:
            with open(os.path.join(self.log_dir, f"{self.lib}-{index}.log")) as f:
                return f.read()[-chars:]
        except OSError:
            return ""


def run_library(lib: str, python: str, args: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    """Start the swarm, train, collect every peer's result; the swarm's processes are all gone on return."""
    swarm = Swarm(python, lib, args, log_dir)
    out: dict[str, Any] = {"lib": lib, "python": python, "peers": args.peers, "errors": []}
    t_start = time.perf_counter()
    try:
        swarm.spawn(0, [])
        address = swarm.expect("address", 1, args.startup_timeout).get(0)
        if not address:
            out["errors"].append(f"peer 0 printed no address:\n{swarm.tail(0)}")
            return out
        for i in range(1, args.peers):
            swarm.spawn(i, list(address))
        ready = swarm.expect("ready", args.peers, args.startup_timeout)
        out["startup_s"] = round(time.perf_counter() - t_start, 2)
        if len(ready) < args.peers:
            missing = sorted(set(range(args.peers)) - set(ready))
            out["errors"].append(f"peers {missing} did not get ready; peer {missing[0]}:\n{swarm.tail(missing[0])}")
            return out
        time.sleep(args.settle)  # let every peer's progress tracker see the others before anyone steps
        go = time.time()
        swarm.send("go")
        results = swarm.expect("result", args.peers, args.time_limit + 60 + 2 * args.timeout)
        out["go_at"] = go
        out["results"] = [results[i] for i in sorted(results)]
        for i in sorted(set(range(args.peers)) - set(results)):
            out["errors"].append(f"peer {i} gave no result:\n{swarm.tail(i)}")
        for r in out["results"]:
            if r.get("errors"):
                out["errors"].append(f"peer {r['index']}: {r['errors']}:\n{swarm.tail(r['index'])}")
    finally:
        swarm.stop()
    out["total_s"] = round(time.perf_counter() - t_start, 2)
    return out


# ------------------------------------------------------------------------------------------------ figures
def divergence(fingerprints: list[list[float]]) -> float:
    """The largest distance of one peer's fingerprint from the peers' mean, relative to the mean's norm."""
    mean = [sum(column) / len(column) for column in zip(*fingerprints)]
    norm = math.sqrt(sum(m * m for m in mean))
    return max(math.dist(f, mean) for f in fingerprints) / max(norm, 1e-300)


def reach_times(result: dict[str, Any], epochs: int) -> dict[int, tuple[float, float]]:
    """``epoch -> (when the peer reached it, forward/backward seconds spent reaching it)``; a peer that skipped
    epochs (it loaded the state) reaches the skipped ones at the same moment, with the compute on the first."""
    out: dict[int, tuple[float, float]] = {}
    previous = result.get("start_epoch", 0)
    for record in result["epochs"]:
        for e in range(previous + 1, min(record["epoch"], epochs) + 1):
            out[e] = (record["at"], record["compute_s"] if e == previous + 1 else 0.0)
        previous = max(previous, record["epoch"])
    return out


def summarize(run: dict[str, Any], epochs: int) -> dict[str, Any]:
    results = run.get("results") or []
    s: dict[str, Any] = {"lib": run["lib"], "peers_reporting": len(results), "errors": len(run["errors"]),
                         "startup_s": run.get("startup_s"), "total_s": run.get("total_s")}
    if not results:
        return s
    reached = [reach_times(r, epochs) for r in results]
    firsts = [r["first_step_at"] for r in results if r.get("first_step_at")]
    t0 = min(firsts) if firsts else run["go_at"]
    last_epoch = max((max(rt) for rt in reached if rt), default=0)
    s["finished"] = sum(bool(r["finished"]) for r in results)
    s["last_epoch"] = last_epoch
    if s["finished"] == run["peers"]:  # every peer reached the last epoch: until the last one did
        t_end = max(rt[epochs][0] for rt in reached)
    else:  # some did not (stopped by the time limit, or failed): until the last peer stopped
        t_end = max(r["ended_at"] for r in results)
    wall = max(1e-9, t_end - t0)
    samples = sum(r["samples"] for r in results)
    s["samples"] = samples
    s["wall_s"] = round(wall, 3)
    s["samples_per_s"] = round(samples / wall, 2)
    s["compute_s_mean"] = round(statistics.mean(r["compute_s"] for r in results), 3)

    per_epoch = []
    previous_end = t0
    for e in range(1, last_epoch + 1):
        here = [rt[e] for rt in reached if e in rt]
        end = max(t for t, _ in here)
        slowest = max(c for _, c in here)
        # every peer that reached it averaged for it (a peer that jumped over e by loading the state did not)
        flags = []
        prints = []
        for r in results:
            rec = next((rec for rec in r["epochs"] if rec["epoch"] >= e), None)
            if rec is None:
                continue
            flags.append(rec["averaged"] if rec["epoch"] == e else False)
            prints.append(rec["fingerprint"])
        per_epoch.append({"epoch": e, "wall_s": round(end - previous_end, 3), "slowest_compute_s": round(slowest, 4),
                          "overhead_s": round(max(0.0, end - previous_end - slowest), 3), "peers": len(here),
                          "all_averaged": None if all(f is None for f in flags) else all(f is True for f in flags),
                          "averaged_peers": sum(f is True for f in flags),
                          "divergence": float(f"{divergence(prints):.3g}") if len(prints) == len(results) else None})
        previous_end = end
    s["per_epoch"] = per_epoch
    overheads = [p["overhead_s"] for p in per_epoch]
    if overheads:
        s["overhead_mean_s"] = round(statistics.mean(overheads), 3)
        s["overhead_median_s"] = round(statistics.median(overheads), 3)
    known = [p["all_averaged"] for p in per_epoch if p["all_averaged"] is not None]
    s["all_averaged_share"] = round(sum(known) / len(known), 3) if known else None
    s["averaging_signal"] = sorted({rec["source"] for r in results for rec in r["epochs"]})
    spreads = [p["divergence"] for p in per_epoch if p["divergence"] is not None]
    s["divergence_median"] = float(f"{statistics.median(spreads):.3g}") if spreads else None
    s["divergence_last"] = per_epoch[-1]["divergence"] if per_epoch else None
    s["in_sync_share"] = round(sum(d < IN_SYNC for d in spreads) / len(per_epoch), 3) if per_epoch else None
    groups = [rec["group"] for r in results for rec in r["epochs"] if rec.get("group")]
    s["group_mean"] = round(statistics.mean(groups), 2) if groups else None
    s["test_loss"] = round(statistics.mean(r["test"]["loss"] for r in results), 4)
    s["test_accuracy"] = round(statistics.mean(r["test"]["accuracy"] for r in results), 4)
    s["rss_mib_mean"] = round(statistics.mean(r["rss_mib"] for r in results), 1)
    s["rss_mib_max"] = round(max(r["rss_mib"] for r in results), 1)
    s["tree_rss_mib_mean"] = round(statistics.mean(r["tree_rss_mib"] for r in results), 1)
    s["processes_per_peer"] = max(r["processes"] for r in results)
    s["stuck_in_step"] = sum(bool(r.get("stuck_in_step")) for r in results)
    return s


def show(s: dict[str, Any], args: argparse.Namespace) -> None:
    tag = f"[{s['lib']}]"
    if "samples_per_s" not in s:
        print(f"{tag} no results ({s['errors']} errors)")
        return
    share = "n/a (no signal)" if s["all_averaged_share"] is None else f"{100 * s['all_averaged_share']:.0f}%"
    print(f"{tag} {args.peers} peers, {s['finished']}/{s['peers_reporting']} reached epoch {args.epochs} "
          f"(last epoch {s['last_epoch']}) in {s['wall_s']:.1f} s; start-up {s['startup_s']} s")
    print(f"{tag} swarm {s['samples_per_s']:.1f} samples/s ({s['samples']} samples); epoch transition overhead "
          f"mean {s.get('overhead_mean_s', float('nan')):.2f} s, median {s.get('overhead_median_s', float('nan')):.2f} s "
          f"(compute per peer {s['compute_s_mean']:.2f} s in all)")
    print(f"{tag} every peer averaged in {share} of epochs (signal: {', '.join(s['averaging_signal'])}"
          + (f"; mean group {s['group_mean']}" if s["group_mean"] else "") + "); parameters: "
          f"in sync (relative spread < {IN_SYNC:g}) after {100 * s['in_sync_share']:.0f}% of epochs, spread median "
          f"{s['divergence_median']}, after the last {s['divergence_last']}")
    print(f"{tag} held-out loss {s['test_loss']:.4f}, accuracy {100 * s['test_accuracy']:.1f}% (mean over peers); "
          f"RSS per peer mean {s['rss_mib_mean']:.0f} MiB, max {s['rss_mib_max']:.0f} MiB; with helper processes "
          f"({s['processes_per_peer']} per peer) {s['tree_rss_mib_mean']:.0f} MiB"
          + (f"; {s['stuck_in_step']} peers stuck in opt.step() at the time limit" if s["stuck_in_step"] else "")
          + (f"; {s['errors']} errors" if s["errors"] else ""))
    print(f"{tag} per epoch (wall s / overhead s / peers averaged): "
          + " ".join(f"{p['epoch']}:{p['wall_s']:.1f}/{p['overhead_s']:.1f}/{p['averaged_peers']}" for p in s["per_epoch"]))


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    if "samples_per_s" not in ours or "samples_per_s" not in theirs:
        return {}
    out = {"samples_per_s_hivesim_over_hivemind": round(ours["samples_per_s"] / max(theirs["samples_per_s"], 1e-9), 2)}
    for key in ("overhead_mean_s", "overhead_median_s"):  # None where hivesim's is under 10 ms: no meaningful ratio
        if key in ours and key in theirs:
            out[f"{key}_hivemind_over_hivesim"] = round(theirs[key] / ours[key], 2) if ours[key] >= 0.01 else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", choices=["hivemind"], help="also run hivemind on the same job and print ratios")
    parser.add_argument("--only", choices=["hivesim", "hivemind"], help="run one library only")
    parser.add_argument("--hivemind-python", default=os.environ.get("HIVEMIND_PYTHON"))
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--matchmaking-time", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="averaging_timeout")
    parser.add_argument("--time-limit", type=float, default=600.0, help="per library: training stops this long after go")
    parser.add_argument("--settle", type=float, default=12.0,
                        help="seconds between all peers ready and go, for their progress trackers to see each other "
                             "(hivemind's looks again within 3 to 10 s)")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="unmeasured steps each peer makes before ready (a peer that has not stepped is invisible "
                             "to hivemind's progress trackers); 0: none")
    parser.add_argument("--step-time", type=float, default=0.0,
                        help="pad each peer's forward/backward to at least this many s by sleeping (a slower "
                             "accelerator: the epochs get longer, the cores stay free); 0: the job as it is")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--keep-training", action="store_true",
                        help="peers that reached the last epoch go on training (unmeasured) until every peer has; "
                             "default: they idle, as at the end of a real job")
    parser.add_argument("--peer-debug", action="store_true",
                        help="peers log their optimizer's DEBUG records too (to --log-dir); kill -USR1 PEER_PID dumps "
                             "a peer's stacks there")
    parser.add_argument("--log-dir", help="keep every peer's stderr here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (summaries, ratios, raw results)")
    args = parser.parse_args()

    libs = [args.only] if args.only else ["hivesim"] + (["hivemind"] if args.against == "hivemind" else [])
    if "hivemind" in libs and not args.hivemind_python:
        message = f"hivemind's side needs a Python that has hivemind: --hivemind-python or HIVEMIND_PYTHON; set one up with\n    {SETUP}"
        if args.only == "hivemind":
            sys.exit(message)
        print(f"{message}\nhivemind's side skipped", file=sys.stderr, flush=True)
        libs.remove("hivemind")
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="bench_optimizer_")
    os.makedirs(log_dir, exist_ok=True)
    pythons = {"hivesim": sys.executable, "hivemind": args.hivemind_python}
    runs, summaries = {}, {}
    for lib in libs:
        runs[lib] = run_library(lib, pythons[lib], args, log_dir)
        summaries[lib] = summarize(runs[lib], args.epochs)
        if not args.json:
            show(summaries[lib], args)
            for error in runs[lib]["errors"]:
                print(f"[{lib}] {error}")
    ratios = compare(summaries["hivesim"], summaries["hivemind"]) if len(summaries) == 2 else {}
    if args.json:
        print(json.dumps({"args": vars(args), "summaries": summaries, "ratios": ratios, "runs": runs}))
        return
    if ratios:
        ours, theirs = summaries["hivesim"], summaries["hivemind"]

        def x(key: str) -> str:
            value = ratios.get(f"{key}_hivemind_over_hivesim")
            return f"{ours.get(key)} s vs {theirs.get(key)} s ({'n/a' if value is None else f'{value}x'})"

        print(f"hivesim vs hivemind: samples/s {ours['samples_per_s']:.1f} vs {theirs['samples_per_s']:.1f} "
              f"({ratios['samples_per_s_hivesim_over_hivemind']:.2f}x); epoch overhead mean {x('overhead_mean_s')}, "
              f"median {x('overhead_median_s')}; every peer averaged {ours['all_averaged_share']} vs "
              f"{theirs['all_averaged_share']} of epochs; held-out loss {ours['test_loss']} vs {theirs['test_loss']}; "
              f"RSS per peer {ours['rss_mib_mean']:.0f} vs {theirs['rss_mib_mean']:.0f} MiB "
              f"({ours['tree_rss_mib_mean']:.0f} vs {theirs['tree_rss_mib_mean']:.0f} MiB with helper processes)")
    print(f"peer logs: {log_dir}")


if __name__ == "__main__":
    main()
