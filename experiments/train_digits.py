"""A small model and its data for collaborative training: an MLP on scikit-learn's 8x8 digits.

The ``trainer`` role (``hivesim/roles/trainer.py``) loads a module like this one by its path
(``model: experiments.train_digits``) and calls:

* ``make_model(seed)``: the model; every peer of a run builds it from the same seed, so the swarm starts
  from one set of parameters (a newcomer downloads the current ones anyway);
* ``batches(shard, batch_size, seed, num_shards)``: an endless iterator of ``(x, y)`` training batches
  drawn from this peer's shard of the training set;
* ``loss(model, batch)``: the training loss of one batch (a scalar tensor);
* ``evaluate(model)``: ``{"loss", "accuracy"}`` on the held-out set;
* ``shard_of(name, num_shards)``: which shard a peer named ``name`` trains on.

The data ships with scikit-learn (nothing is downloaded): 1,797 images, split once with a fixed seed into
1,397 for training and 400 held out, standardised with the training set's statistics.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from functools import lru_cache

import torch
from torch import nn

INPUTS, HIDDEN, CLASSES = 64, 128, 10
HELD_OUT = 400


@lru_cache(maxsize=1)
def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x, train_y, test_x, test_y)``: a fixed split (seed 0), standardised."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train_x, test_x = x[HELD_OUT:], x[:HELD_OUT]
    mean, std = train_x.mean(0), train_x.std(0) + 1.0
    return (train_x - mean) / std, y[HELD_OUT:], (test_x - mean) / std, y[:HELD_OUT]


def shard_of(name: str, num_shards: int) -> int:
    """``trainers.3`` -> shard 3 (mod ``num_shards``); other names by a stable hash."""
    tail = name.rsplit(".", 1)[-1]
    index = int(tail) if tail.isdigit() else zlib.crc32(name.encode())
    return index % max(1, num_shards)


def shard_indices(shard: int, num_shards: int) -> torch.Tensor:
    """Indices of the training set that shard ``shard`` of ``num_shards`` holds (disjoint, covering all)."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    return torch.arange(shard, len(dataset()[0]), num_shards)


def make_model(seed: int = 0) -> nn.Module:
    """``Linear(64 -> 128) -> ReLU -> Linear(128 -> 10)``, initialised from ``seed``."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    finally:
        torch.random.set_rng_state(generator_state)


def batches(shard: int, batch_size: int, seed: int = 0, num_shards: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of ``batch_size`` from shard ``shard`` (reshuffled every pass)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    train_x, train_y, _, _ = dataset()
    indices = shard_indices(shard, num_shards)
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = indices[torch.randperm(len(indices), generator=generator)]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = order[start : start + batch_size]
            yield train_x[chosen], train_y[chosen]
        if len(order) < batch_size:  # a shard smaller than a batch: sample with replacement
            chosen = indices[torch.randint(len(indices), (batch_size,), generator=generator)]
            yield train_x[chosen], train_y[chosen]


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def evaluate(model: nn.Module) -> dict[str, float]:
    """Held-out cross-entropy and accuracy."""
    _, _, test_x, test_y = dataset()
    with torch.no_grad():
        logits = model(test_x)
        return {"loss": float(nn.functional.cross_entropy(logits, test_y)),
                "accuracy": float((logits.argmax(1) == test_y).float().mean())}
