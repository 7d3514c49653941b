"""The collaborative-training study end to end: ``python -m experiments.collab_study --short`` (every method side
by side on Ray, 4 peers each, and hivemind's Optimizer when its venv is there), and the full study (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import char_lm
from experiments.collab_study import StudyTrainer, plan, FULL, SHORT

ROOT = Path(__file__).resolve().parents[1]
HIVEMIND_PYTHON = os.environ.get("HIVEMIND_PYTHON")  # hivemind's side runs only where its venv is named


def test_char_lm_data_and_model():
    train, held = char_lm.blocks()
    assert len(train) > 10 * len(held) > 0 and train.shape[1] == char_lm.BLOCK
    shards = [char_lm.shard_blocks(i, 4) for i in range(4)]
    assert sum(len(s) for s in shards) == len(train)
    batch = next(char_lm.batches(1, 8, seed=3, num_shards=4))
    assert batch.shape == (8, char_lm.CONTEXT + 1) and batch.dtype == torch.long
    assert torch.equal(batch, next(char_lm.batches(1, 8, seed=3, num_shards=4)))  # seeded
    a, b = char_lm.make_model(0), char_lm.make_model(0)
    assert 500_000 < char_lm.num_parameters(a) < 3_000_000
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert 5.0 < char_lm.evaluate(a)["loss"] < 5.6  # about ln 256 at the start


def test_study_trainer_group_overrides():
    class FakePeer:
        name = "clients.2"

    role = StudyTrainer(FakePeer(), model="experiments.char_lm", num_shards=8, optimizer_opts={"averaging_timeout": 5},
                        by_group={"clients": {"method": "diloco", "shard_offset": 4,
                                              "optimizer_opts": {"client_mode": True}}})
    assert role.method == "diloco" and role.shard == 6
    assert role.optimizer_opts == {"averaging_timeout": 5, "client_mode": True}
    with pytest.raises(ValueError):
        StudyTrainer(FakePeer(), model="experiments.char_lm", method="nope")
    labels = [e["label"] for e in plan(FULL)]
    assert {"alone", "gradient_averaging", "local_updates", "diloco", "diloco_streaming",
            "diloco slow_links", "gradient_averaging churn", "diloco clients"} <= set(labels)
    assert {e["method"] for e in plan(SHORT)} == {"gradient_averaging", "local_updates", "diloco", "diloco_streaming", "alone"}


def run_study(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "experiments.collab_study", "--out", str(out), *args]
    if HIVEMIND_PYTHON:
        command += ["--hivemind-python", HIVEMIND_PYTHON]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def check_study(out: Path, expected_methods: set[str]) -> None:
    figure, table = out / "collab_study.png", out / "collab_study.md"
    assert figure.exists() and figure.stat().st_size > 20_000
    text = table.read_text()
    assert "| run | setup |" in text and "What the papers report" in text and "DiLoCo" in text
    from analysis.collab_study import load_study

    _, rows = load_study(out)
    assert expected_methods <= {r["method"] for r in rows}
    for r in rows:
        assert r["trainers"] >= 1, r["label"]
        assert not r["failures"], (r["label"], r["failures"])
        # every method trained: held-out loss went down from the common start
        assert r["initial_loss"] is not None and r["final_loss"] is not None, r["label"]
        assert r["final_loss"] < r["initial_loss"] - 0.5, (r["label"], r["initial_loss"], r["final_loss"])
    if HIVEMIND_PYTHON:
        assert any(r.get("lib") == "hivemind" for r in rows), "hivemind's Optimizer did not run"


def test_collab_study_short(tmp_path):
    out = run_study(tmp_path, "--short", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    check_study(tmp_path, {"gradient_averaging", "local_updates", "diloco", "diloco_streaming", "alone"})
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["config"]["peers"] == 4


@pytest.mark.slow
def test_collab_study_full(tmp_path):
    out = run_study(tmp_path, timeout=3600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    check_study(tmp_path, {"gradient_averaging", "local_updates", "diloco", "diloco_streaming", "alone"})
