"""The training job of ``bench_optimizer.py``: data, model, evaluation and measurements, library-neutral.

Imports only the standard library, torch, numpy and scikit-learn, so that it loads in hivesim's venv and in
hivemind's alike; ``optimizer_peer.py`` adds the library.

* data: scikit-learn's ``load_digits`` (1,797 8x8 images, shipped with the package: nothing is
  downloaded), one fixed train/test split (``test_size=0.2``, ``random_state=0``, stratified), pixel values
  scaled to [0, 1]; peer ``i`` of ``N`` trains on shard ``i`` of the shuffled training set (every peer its
  own data) and samples its batches with replacement from a generator seeded by its index;
* model: an MLP 64 -> 256 -> 256 -> 10 with ReLU, initialised from one seed: identical on every peer;
* evaluation: cross-entropy and accuracy of the whole model on the held-out test set.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import torch
from torch import nn

TEST_SIZE = 0.2
SPLIT_SEED = 0
MODEL_SEED = 0


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: float32 features in [0, 1], int64 labels; the same on every call."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    return x_train, y_train, x_test, y_test


def shard(x: np.ndarray, y: np.ndarray, index: int, peers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Peer ``index``'s part of the training set: a fixed shuffle cut into ``peers`` nearly equal shards."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    part = np.array_split(order, peers)[index]
    return torch.from_numpy(x[part]), torch.from_numpy(y[part])


class Batches:
    """Batches of ``size`` drawn with replacement from a shard, by a generator seeded with the peer's index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int, seed: int) -> None:
        self.x, self.y, self.size = x, y, size
        self.gen = torch.Generator().manual_seed(1000 + seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.x), (self.size,), generator=self.gen)
        return self.x[idx], self.y[idx]


def make_model() -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    logits = model(torch.from_numpy(x))
    target = torch.from_numpy(y)
    loss = nn.functional.cross_entropy(logits, target).item()
    accuracy = (logits.argmax(-1) == target).float().mean().item()
    return {"loss": round(loss, 5), "accuracy": round(accuracy, 5)}


class Fingerprint:
    """``DIMS`` fixed random projections (float64) of the flat parameter vector, the same on every peer: the
    distance between two peers' fingerprints over the norm of one estimates the relative distance between
    their parameters (bitwise-equal parameters give equal fingerprints; hivemind's all-reduce adds each
    peer's delta to its own tensors, so peers that averaged together agree only up to rounding, ~1e-7)."""

    DIMS = 8

    def __init__(self, model: nn.Module) -> None:
        n = sum(p.numel() for p in model.parameters())
        self.matrix = torch.randn(self.DIMS, n, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> list[float]:
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float64)
        return [float(v) for v in self.matrix @ flat]


# ------------------------------------------------------------------------------------------------ memory
def _status_kib(pid: int | str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def own_peak_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    return round(_status_kib("self", "VmHWM") / 1024, 1)


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root`` (hivemind's DHT process and p2p daemons, for instance)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_rss_mib() -> float:
    """Resident set of this process and all its descendants together, now, MiB."""
    pid = os.getpid()
    return round(sum(_status_kib(p, "VmRSS") for p in [pid, *descendants(pid)]) / 1024, 1)


class TreeRSSSampler:
    """Samples :func:`tree_rss_mib` every ``period`` s in a daemon thread and keeps the maximum: a peer's
    memory including the helper processes its library starts (hivemind runs its DHT in a child process and
    a p2p daemon beside it; hivesim runs everything in the peer's own process)."""

    def __init__(self, period: float = 1.0) -> None:
        self.peak = 0.0
        self.processes = 1
        self._stop = threading.Event()
        self._period = period
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._period)

    def sample(self) -> float:
        now = tree_rss_mib()
        self.peak = max(self.peak, now)
        self.processes = max(self.processes, 1 + len(descendants(os.getpid())))
        return now

    def stop(self) -> None:
        self._stop.set()


def now() -> float:
    """Wall-clock time comparable between the peers of one machine."""
    return time.time()
