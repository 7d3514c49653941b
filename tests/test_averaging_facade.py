"""The blocking ``DecentralizedAverager`` on ``DHT`` facades (hivemind's shape), and the study end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from hivesim import DHT, AllreduceException, DecentralizedAverager


def test_blocking_averager_on_dht_facades():
    dhts = [DHT()]
    averagers: list[DecentralizedAverager] = []
    try:
        for _ in range(3):
            dhts.append(DHT(initial_peers=dhts[0].get_visible_addresses()))
        values = [1.0, 2.0, 3.0, 10.0]
        averagers = [DecentralizedAverager([torch.full((5, 2), v), torch.zeros(3)], dht, prefix="facade",
                                           target_group_size=4, compression="float16") for dht, v in zip(dhts, values)]
        results: list = [None] * 4

        def work(i: int) -> None:
            results[i] = averagers[i].step(weight=1.0, timeout=20, gather={"i": i})

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        for i, result in enumerate(results):
            assert result is not None and result.group_size == 4
            assert sorted(g["i"] for g in result.values()) == [0, 1, 2, 3]
            with averagers[i].get_tensors() as (a, b):
                torch.testing.assert_close(a, torch.full((5, 2), 4.0))
                a.add_(1.0)  # local changes persist
            with averagers[i].get_tensors() as (a, b):
                assert a[0, 0].item() == 5.0
        # a lone averager gives up within its timeout: hivemind's AllreduceException, or None when asked
        with pytest.raises(AllreduceException):
            averagers[0].step(timeout=1.0)
        assert averagers[0].step(timeout=1.0, raise_on_failure=False) is None
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_moshpit_study_end_to_end(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "hivesim.cli", "run", "topologies/moshpit_16.yaml", "duration=30", "workload.params.restarts=1", "workload.params.rounds=3", "workload.params.methods=[moshpit,allreduce]",
         "workload.params.warmup=2", "workload.params.period=3.0", "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "moshpit_averaging.png").stat().st_size > 10_000
    summary = json.loads((run_dir / "summary.json").read_text())
    methods = summary["workload"]["methods"]
    assert set(methods) == {"moshpit", "allreduce"}
    for data in methods.values():
        assert data["peers_reporting"] == [16, 16, 16, 16]  # every peer recorded every round
    assert methods["moshpit"]["mse"][0] > 0.1
    # Exactness in two rounds needs every line of the grid to form a full group inside its window; through
    # Ray on a loaded 2-core box a line sometimes misses a member (tests/test_averaging.py checks exactness
    # in-process). Here: every round averages, and the spread falls by two orders of magnitude in 3 rounds.
    mse = methods["moshpit"]["mse"]
    assert mse[1] < 0.3 * mse[0] and mse[2] < 0.1 * mse[0] and mse[3] < 0.01 * mse[0], methods["moshpit"]
    assert methods["allreduce"]["mse"][1] < 1e-9, methods["allreduce"]  # p = 0: everyone takes part, exact after one
    assert "rounds to 1e-9" in (run_dir / "moshpit_table.md").read_text()
