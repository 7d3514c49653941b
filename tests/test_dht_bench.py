"""The DHT benchmarks run end to end at a small size (the full-size runs are documented in docs/dht.md)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run_json(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / script), *args, "--json"], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_dht_with_peers_spread_over_processes():
    result = run_json("bench_dht.py", "--peers", "6", "--workers", "2", "--rounds", "2", "--stores", "3", "--gets", "3",
                      "--hivesim-procs", "2")
    assert result["calls"] == "2 processes" and result["killed"] == 0
    assert result["stores"] == 12 and result["store_success"] == 1.0 and result["get_success"] == 1.0


def test_swarm_scale_script_packs_peers_into_processes_without_torch():
    result = run_json("dht_swarm_scale.py", "--peers", "48", "--procs", "2", "--keys", "16", "--lookups", "60")
    assert result["peers_up"] == 48 and result["processes"] == 2
    assert result["store_success"] == 1.0 and result["lookup_success"] >= 0.99
    assert result["torch_loaded"] is False and result["rss_total_mib"] > 0 and result["hops_mean"] >= 0
