"""``topologies/dht_1024.yaml`` through ``hivesim run``: lookups found under churn, bootstrap in doubling
waves, memory in the summary. CI runs it at 128 peers (same file, overrides, faster rates); the full
1,024-peer run (about 6 minutes on 2 cores) is ``--runslow``."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "topologies" / "dht_1024.yaml"


def _run(tmp_path: Path, overrides: list[str], timeout: float) -> dict:
    out = subprocess.run([sys.executable, "-m", "hivesim.cli", "run", str(TOPOLOGY), *overrides,
                          "--results-dir", str(tmp_path), "--quiet"],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    assert (run_dir / "samples.jsonl").exists() and (run_dir / "dht_lookup.png").exists()
    return json.loads((run_dir / "summary.json").read_text())


def _check(summary: dict, peers: int, per_actor: int, owners: float) -> None:
    assert summary["error"] is None and summary["peers"] == peers
    assert summary["actors_at_start"] == 2 * math.ceil(peers / 2 / per_actor)  # two groups, each packed
    boot = summary["bootstrap"]
    # the swarm doubles each wave up to 128 joining at once (128 peers: 6 waves, 1,024: 13), not waves of 8 (17, 129)
    assert boot["peers"] == peers and boot["waves"] <= 2 + math.log2(min(peers, 128)) + math.ceil(max(0, peers - 128) / 128), boot
    assert summary["events"]["kill"] > 0 and summary["events"]["join"] > 0  # there was churn
    work = summary["workload"]
    assert work["success_rate"] >= 0.99, work
    assert work["owners_looked_up"] >= owners * peers, work  # the lookups sought keys all over the swarm
    memory = summary["memory_mib"]
    assert memory["actors_total_at_end"] > 0 and memory["per_actor_mean"] > 0 and memory["per_actor_max"] > 0
    assert len(summary["actors"]) == summary["actors_at_end"] and all(a["rss_mib"] > 0 for a in summary["actors"])


def test_128_peers_of_the_1024_topology_find_their_lookups(tmp_path):
    # churn made stronger than the full run's (mean lifetime 2 min: ~30 kills in 30 s), lookups more frequent
    summary = _run(tmp_path, ["groups.a.count=64", "groups.b.count=64", "duration=30", "churn.lifetime.mean=120",
                              "workload.params.interval=2.0", "workload.params.refresh=10",
                              "workload.params.directory_every=5", "workload.params.warmup=5"], timeout=150)
    _check(summary, 128, 64, owners=0.75)
    assert summary["workload"]["lookups"] >= 500


@pytest.mark.slow
def test_1024_peers_find_their_lookups(tmp_path):
    summary = _run(tmp_path, [], timeout=1500)
    # stores are spread over 5 minutes and a peer refreshes its directory every 2: lookups favour the peers
    # that declared early (the recorded run looked up 373 distinct peers' keys in 2,503 lookups)
    _check(summary, 1024, 64, owners=0.25)
    assert summary["workload"]["lookups"] >= 2000
