"""``hivesim run`` end to end: a small swarm on a local Ray, churn, results folder, figure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOPOLOGY = """\
name: tiny
seed: 11
duration: 8
groups:
  left: {count: 3, region: l}
  right: {count: 3, region: r, peers_per_actor: 3}
network:
  latency: {regions: {l: {l: 0.005, r: 0.04}, r: {r: 0.005}}}
churn:
  kills:
    - {at: 3, peers: [left.1, right.2], mode: abrupt, rejoin_after: 2}
    - {at: 4, peers: [left.2], mode: graceful}
workload:
  module: experiments.dht_lookup
  params: {interval: 0.2, ttl: 30, warmup: 0.5}
collect_every: 1.0
"""


def run(tmp_path, name):
    topology = tmp_path / "tiny.yaml"
    topology.write_text(TOPOLOGY)
    out = subprocess.run(
        [sys.executable, "-m", "hivesim.cli", "run", str(topology), "--results-dir", str(tmp_path / name)],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / name).iterdir()
    return run_dir, out


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("runs"), "first")


def test_run_writes_results_and_survives_churn(first_run, tmp_path):
    run_dir, out = first_run
    assert "results:" in out.stderr and "figure:" in out.stderr
    for name in ("config.yaml", "events.jsonl", "samples.jsonl", "peers.jsonl", "summary.json", "dht_lookup.png"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "dht_lookup.png").stat().st_size > 10_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["peers"] == 6 and summary["events"]["kill"] == 3 and summary["events"]["join"] == 2
    assert summary["workload"]["lookups"] > 20
    assert summary["workload"]["success_rate"] >= 0.9  # the workload kept going through the kills
    assert summary["shaper"]["held_messages"] > 0 and summary["shaper"]["mean_late_ms"] < 20

    events = [e for e in read(run_dir / "events.jsonl")]
    # one clock: the schedule's zero is recorded, and the figures' time axis starts there (issue 16: a kill
    # scheduled at 3 s was drawn where the first sample happened to be)
    from analysis.common import load_run, run_start

    assert summary["clock_zero"] and run_start(load_run(run_dir)) == summary["clock_zero"]
    for e in events:
        assert abs(e["wall"] - summary["clock_zero"] - e["actual_t"]) < 0.05, e
    assert [(e["action"], e["peer"]) for e in events] == [
        ("kill", "left.1"), ("kill", "right.2"), ("kill", "left.2"), ("join", "left.1"), ("join", "right.2")
    ]
    assert all(e["ok"] for e in events)
    # the killed peers' metrics outlived them: their first incarnations are in the results
    peers = read(run_dir / "peers.jsonl")
    incarnations = {(p["peer"], p["incarnation"]) for p in peers}
    assert {("left.1", 1), ("left.1", 2), ("right.2", 1), ("right.2", 2), ("left.2", 1)} <= incarnations
    samples = read(run_dir / "samples.jsonl")
    before_kill = [s for s in samples if s["peer"] == "left.1" and s["name"] == "lookup"]
    assert before_kill, "the abruptly killed peer's lookups were lost"

    # the same seed gives the same event log
    again, _ = run(tmp_path, "second")
    strip = lambda es: [(e["t"], e["action"], e["peer"], e["mode"]) for e in es]  # noqa: E731
    assert strip(read(again / "events.jsonl")) == strip(events)


def test_plot_remakes_the_figures(first_run):
    run_dir, _ = first_run
    (run_dir / "dht_lookup.png").unlink()
    out = subprocess.run([sys.executable, "-m", "hivesim.cli", "plot", str(run_dir)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert (run_dir / "dht_lookup.png").exists() and "success_rate" in out.stdout


def test_bad_topology_is_a_clear_error_not_a_traceback(tmp_path):
    topology = tmp_path / "bad.yaml"
    topology.write_text(TOPOLOGY.replace("count: 3, region: l", "count: three, region: l"))
    out = subprocess.run([sys.executable, "-m", "hivesim.cli", "run", str(topology)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "bad.yaml:5: groups.left.count" in out.stderr and "Traceback" not in out.stderr


def test_figures_use_the_run_clock(tmp_path):
    """A kill at 15 s on the run's clock is drawn at 15 s, whenever the first sample came."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.common import load_run, mark_events, run_start

    zero = 1_700_000_000.0
    (tmp_path / "summary.json").write_text(json.dumps({"name": "t", "clock_zero": zero}))
    (tmp_path / "samples.jsonl").write_text(json.dumps({"t": zero + 15.8, "name": "lookup", "value": 0.01}) + "\n")
    (tmp_path / "events.jsonl").write_text(json.dumps({"t": 15, "action": "kill", "peer": "a.0", "actual_t": 15.02,
                                                       "wall": zero + 15.02}) + "\n")
    run = load_run(tmp_path)
    assert run_start(run) == zero
    fig, ax = plt.subplots()
    mark_events(ax, run, run_start(run))
    assert abs(ax.lines[0].get_xdata()[0] - 15.02) < 1e-6
    plt.close(fig)
    (tmp_path / "summary.json").write_text(json.dumps({"name": "t"}))  # a folder from before clock_zero
    assert abs(run_start(load_run(tmp_path)) - zero) < 1e-6


def test_quiet_run_prints_its_folder_and_ctrl_c_exits_130(tmp_path):
    """--quiet printed nothing at all, and an interrupted run exited 0."""
    import signal
    import time

    topology = tmp_path / "long.yaml"
    topology.write_text(TOPOLOGY.replace("duration: 8", "duration: 120"))
    results = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "hivesim.cli", "run", str(topology), "--quiet", "--results-dir", str(results)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(results.glob("*/samples.jsonl"))
            if found and found[0].stat().st_size > 0:  # the workload runs and its samples are being collected
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-3000:]
    (run_dir,) = results.iterdir()
    assert out.strip().splitlines()[-1] == str(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["interrupted"] is True
    assert "Traceback" not in err
