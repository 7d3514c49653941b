"""Collaborative training end to end: the trainer and monitor roles in process, ``hivesim monitor``'s
argument errors, and ``hivesim run topologies/train_quickstart.yaml`` (trainers on Ray, a kill, a newcomer)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from experiments import train_digits
from hivesim.peer import Peer
from hivesim.roles.monitor import format_line
from hivesim.roles.trainer import TrainerRole

ROOT = Path(__file__).resolve().parents[1]
TRAINER = dict(model="experiments.train_digits", run_id="t2", target_batch_size=512, batch_size=32, lr=3e-3,
               step_delay=0.01, num_shards=2, optimizer_opts={"averaging_timeout": 5.0})


async def wait_until(condition, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(step)
    return condition()


async def test_monitor_reads_two_in_process_trainers(tmp_path):
    peers: list[Peer] = []
    try:
        a = await Peer("trainers.0", {"trainer": TRAINER}).start()
        peers.append(a)
        b = await Peer("trainers.1", {"trainer": TRAINER}).start([a.address])
        peers.append(b)
        m = await Peer("monitor", {"monitor": {"run_id": "t2", "interval": 0.5, "checkpoint_dir": str(tmp_path / "ckpt"),
                                               "checkpoint_every": 3, "model": "experiments.train_digits"}}).start([a.address])
        peers.append(m)
        monitor = m.roles["monitor"]
        lines: list[str] = []
        monitor.on_line = lines.append
        trainers = [p.roles["trainer"] for p in (a, b)]

        assert await wait_until(lambda: monitor.epoch >= 4 and monitor.loss is not None and monitor.checkpoints, 40), \
            (monitor.epoch, monitor.loss, lines, [t.error for t in trainers])
        view = await monitor.read()
        assert view["peers_total"] == 2 and view["trainers"] == 2  # both trainers, not the monitor itself
        assert view["epoch"] >= 4 and view["samples_per_second"] > 0 and 0 < view["loss"] < 5
        assert lines and lines[0].startswith("epoch ") and "  peers " in lines[0] and "  samples/s " in lines[0]
        epochs = [int(line.split()[1]) for line in lines]
        assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)  # one line per epoch, in order
        assert m.metrics.samples("swarm_progress") and m.metrics.samples("monitor_epoch")

        # the checkpoint holds the swarm's parameters, loadable into the model
        saved = torch.load(monitor.checkpoints[0])
        assert saved["run_id"] == "t2" and saved["epoch"] >= 3
        model = train_digits.make_model(0)
        model.load_state_dict(saved["model"])
        assert train_digits.evaluate(model)["loss"] < train_digits.evaluate(train_digits.make_model(0))["loss"]

        # the trainers recorded per-epoch samples with the averaging outcome and traffic
        for peer in (a, b):
            epochs = peer.metrics.samples("epoch")
            assert epochs and {"averaged", "group_size", "expected_peers", "bytes_sent", "bytes_received"} <= set(epochs[0])
            assert peer.metrics.samples("eval") and peer.metrics.samples("train_loss")
        assert any(s["averaged"] and s["group_size"] == 2 for p in (a, b) for s in p.metrics.samples("epoch"))

        # an abrupt kill: no stop(), tasks cancelled, sockets closed; the thread notices and ends
        await b.kill()
        assert await wait_until(lambda: trainers[1]._done.done(), 15), "the killed trainer's thread kept running"
        # a polite stop joins the thread and shuts the optimizer down
        t0 = time.monotonic()
        await a.stop()
        assert trainers[0]._done.done() and trainers[0].optimizer._closed and time.monotonic() - t0 < 10
        assert trainers[0].error is None
        assert a.metrics.samples("trainer_done")[-1]["reason"] == "stopped"
    finally:
        for peer in reversed(peers):
            await peer.stop()


def test_trainer_rejects_bad_params():
    peer = SimpleNamespace(name="trainers.0")
    for bad in ({"run_id": "a.b"}, {"batch_size": 0}, {"target_batch_size": -1}, {"lr": 0}, {"optimizer": "lbfgs"},
                {"model": "experiments.dht_lookup"}, {"optimizer_opts": {"params": []}}, {"shard": 9}):
        with pytest.raises(ValueError):
            TrainerRole(peer, **bad)


def test_format_line():
    assert format_line(12, 8, 3210.4, 0.4123) == "epoch 12  peers 8  samples/s 3,210  loss 0.412"
    assert format_line(0, 1, 0.0, None) == "epoch 0  peers 1  samples/s 0  loss -"


def monitor_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hivesim.cli", "monitor", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    ((), "required: --initial-peers, --run-id"),
    (("--initial-peers", "foo", "--run-id", "r"), "not a peer address: 'foo'"),
    (("--initial-peers", "tcp://127.0.0.1:5", "--run-id", "a.b"), "--run-id"),
    (("--initial-peers", "tcp://127.0.0.1:5", "--run-id", "r", "--checkpoint-every", "3"), "go together"),
    (("--initial-peers", "tcp://127.0.0.1:5", "--run-id", "r", "--checkpoint-dir", "d", "--checkpoint-every", "0"), "positive"),
    (("--initial-peers", "tcp://127.0.0.1:5", "--run-id", "r", "--target-batch-size", "0"), "--target-batch-size"),
    (("--initial-peers", "tcp://127.0.0.1:5", "--run-id", "r", "--duration", "-1"), "--duration"),
    (("--initial-peers", "tcp://127.0.0.1:5", "--run-id", "r", "--checkpoint-every", "x"), "invalid int value"),
    (("--initial-peers", "tcp://127.0.0.1:5", "--run-id", "r", "--model", "no_such.module"), "--model"),
    (("--initial-peers", "tcp://127.0.0.1:1", "--run-id", "r", "--duration", "1"), "none of the initial peers answered"),
])
def test_monitor_cli_argument_errors(args, message):
    out = monitor_cli(*args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "error:" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_train_quickstart_run(tmp_path):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "hivesim.cli", "run", "topologies/train_quickstart.yaml", "--quiet",
                          "--results-dir", str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    wall = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    figure = run_dir / "collaborative_training.png"
    assert figure.exists() and figure.stat().st_size > 10_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["events"]["kill"] == 1 and summary["events"]["join"] == 1 and summary["error"] is None
    work = summary["workload"]
    assert work["trainers"] == 5, work
    # the trainers that lived to the end advanced together, and averaged with each other
    assert work["epochs_max"] >= 10 and work["final_epoch_spread"] <= 2, work
    assert work["averaged_share"] >= 0.5, work
    # and trained: held-out loss went down
    assert work["loss_went_down"] and work["final_test_loss"] < 0.5 * work["initial_test_loss"], work
    # the newcomer started from the swarm's state, not from scratch
    newcomer = work["newcomers"]["newcomer.0"]
    assert newcomer["downloaded_state"] and newcomer["state_downloads"] >= 1 and newcomer["first_epoch"] > 0, newcomer
    assert newcomer["final_epoch"] >= work["epochs_max"] - 2, newcomer
    # the monitor logged the epochs
    assert work["monitor"]["epoch_lines"] >= 5 and work["monitor"]["last_epoch"] >= work["epochs_max"] - 5, work

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    # epochs together over time: whenever a survivor changed epoch, every other survivor was within 2 of it
    killed = {"trainers.3"}
    timeline = sorted((s["t"], s["peer"], s["value"]) for s in samples if s["name"] == "epoch" and s["peer"].startswith("trainers"))
    current: dict[str, int] = {}
    worst = 0
    for _, peer, epoch in timeline:
        current[peer] = epoch
        alive = [e for p, e in current.items() if p not in killed]
        if alive:  # (the killed trainer's sample may come first: then no survivor has reported yet)
            worst = max(worst, max(alive) - min(alive))
    assert worst <= 3, worst
    print(f"train_quickstart: {wall:.1f} s wall; {work}")
