"""Short versions of the two DMoE studies (the full-size ones are marked slow), run for real: expert-host
and trainer peers on loopback, shaped links, real training on scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.dmoe_convergence import accuracy_curve, main as convergence_main, run_setup, summarize
from experiments.dmoe_local import write_results
from experiments.dmoe_throughput import main as throughput_main, phase_throughput, sweep


async def test_convergence_with_a_host_killed_and_restored_from_its_checkpoint(tmp_path):
    samples, events = await run_setup("dmoe_churn", hosts=3, trainers=2, updates=80, latency=0.0, layers=1,
                                      grid=[3, 3], k_best=2, hidden=32, ff_dim=32, checkpoint_root=str(tmp_path / "ck"),
                                      log=lambda *a: None)
    actions = [(e["action"], e["peer"]) for e in events if e["peer"].startswith("experts")]
    assert ("kill", "experts.0") in actions and ("kill", "experts.1") in actions
    assert actions.count(("join", "experts.0")) == 2  # it came back
    declared = [e for e in events if e["action"] == "experts_declared" and e["peer"] == "experts.0"]
    assert len(declared) == 2 and all(e["experts"] == 3 for e in declared)  # 9 experts over 3 hosts
    steps = [s for s in samples if s["name"] == "train_step"]
    assert len(steps) == 80  # every trainer reached its updates: no step was lost to the churn for good
    curve = accuracy_curve(samples, "dmoe_churn")
    assert curve[-1][1] > 0.5 and curve[-1][1] > curve[0][1]  # it learns (10 classes: chance is 0.1)
    summary = summarize(samples)
    assert summary["dmoe_churn"]["updates"] == 80
    write_results(tmp_path, {"name": "t"}, samples, [dict(e, setup="dmoe_churn") for e in events], {"workload": summary})
    from analysis.dmoe_convergence import make_figures

    assert make_figures(tmp_path)[0].stat().st_size > 10_000


async def test_latency_hurts_model_parallel_far_more_than_concurrent_dmoe():
    samples, _, phases = await sweep([0.0, 0.05], hosts=2, layers=2, clients=8, hidden=32, batch_size=16,
                                     experts_per_layer=2, min_window=1.5, log=lambda *a: None)
    rate = {(p["mode"], p["latency"]): phase_throughput(samples, p["mode"], p["start"], p["end"])["samples_per_s"]
            for p in phases}
    assert all(v > 0 for v in rate.values()), rate
    # a sequential step waits for 2 layers x (forward + backward) round trips of 100 ms: >= 0.4 s
    assert rate[("model_parallel", 0.05)] < 16 / 0.4 * 1.05
    assert rate[("model_parallel", 0.05)] < 0.5 * rate[("model_parallel", 0.0)]
    # 8 concurrent trainers overlap their waiting
    assert rate[("dmoe", 0.05)] > 3 * rate[("model_parallel", 0.05)]


@pytest.mark.slow
def test_full_convergence_study(tmp_path):
    convergence_main(["--updates", "3000", "--results", str(tmp_path)])
    run = next(tmp_path.iterdir())
    assert (run / "dmoe_convergence.png").exists()


@pytest.mark.slow
def test_full_throughput_study(tmp_path):
    throughput_main(["--results", str(tmp_path)])
    run = next(tmp_path.iterdir())
    assert (run / "dmoe_throughput.png").exists()
