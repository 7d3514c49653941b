"""A few collaborative trainers in one process (one thread each, real DHTs on loopback) for the optim tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from hivesim import DHT, DiLoCoOptimizer, Optimizer

BATCH = 8


def make_model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def make_data(peer: int, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + peer)
    x = torch.randn(n, 6, generator=g) + peer  # every peer's data differ
    return x, x[:, :1] * 0.5 - x[:, 1:2] + 0.1 * torch.randn(n, 1, generator=g)


@dataclass
class Trainer:
    index: int
    dht: DHT
    model: torch.nn.Module
    opt: Optimizer | None = None
    batches: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (epoch, x, y)
    losses: list[float] = field(default_factory=list)
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class Swarm:
    """DHTs and trainers; :meth:`close` stops every optimizer and DHT it made."""

    def __init__(self) -> None:
        self.dhts: list[DHT] = []
        self.trainers: list[Trainer] = []
        self.threads: list[threading.Thread] = []

    def dht(self, **kwargs: Any) -> DHT:
        peers = self.dhts[0].get_visible_addresses() if self.dhts else []
        dht = DHT(initial_peers=peers, **kwargs)
        self.dhts.append(dht)
        return dht

    def trainer(self, *, dht_kwargs: dict | None = None, model: torch.nn.Module | None = None, **opt_kwargs: Any) -> Trainer:
        dht = self.dht(**(dht_kwargs or {}))
        model = model if model is not None else make_model()
        trainer = Trainer(len(self.trainers), dht, model)
        kwargs = dict(run_id="test_run", target_batch_size=3 * BATCH * 6, batch_size_per_step=BATCH,
                      optimizer=partial(torch.optim.SGD, lr=0.05), params=model.parameters(), matchmaking_time=3.0,
                      averaging_timeout=15.0)
        kwargs.update(opt_kwargs)
        if kwargs.get("auxiliary"):
            kwargs.pop("batch_size_per_step", None)
        trainer.opt = Optimizer(dht=dht, **kwargs)
        self.trainers.append(trainer)
        return trainer

    def diloco_trainer(self, *, model: torch.nn.Module | None = None, **opt_kwargs: Any) -> Trainer:
        dht = self.dht()
        model = model if model is not None else make_model()
        trainer = Trainer(len(self.trainers), dht, model)
        kwargs = dict(run_id="diloco_run", params=model.parameters(), num_inner_steps=5, batch_size_per_step=BATCH,
                      inner_optimizer=partial(torch.optim.AdamW, lr=0.01), matchmaking_time=3.0, averaging_timeout=15.0)
        kwargs.update(opt_kwargs)
        trainer.opt = DiLoCoOptimizer(dht=dht, **kwargs)
        self.trainers.append(trainer)
        return trainer

    def run(self, trainer: Trainer, until: Callable[[Trainer], bool], *, step_time: float = 0.02,
            limit: float = 60.0) -> threading.Thread:
        """Train in a thread until ``until(trainer)`` (checked after every step) or ``limit`` seconds."""

        def work() -> None:
            x, y = make_data(trainer.index)
            k = 0
            deadline = time.monotonic() + limit
            try:
                while not until(trainer) and not trainer.stop.is_set() and time.monotonic() < deadline:
                    if getattr(trainer.opt, "auxiliary", False):
                        trainer.opt.step()
                        continue
                    i = (k * BATCH) % (len(x) - BATCH)
                    xb, yb = x[i : i + BATCH], y[i : i + BATCH]
                    k += 1
                    epoch = trainer.opt.local_epoch
                    loss = torch.nn.functional.mse_loss(trainer.model(xb), yb)
                    loss.backward()
                    time.sleep(step_time)  # the "compute" of a peer of a given speed
                    trainer.batches.append((epoch, xb, yb))
                    trainer.losses.append(loss.item())
                    trainer.opt.step()
                    trainer.opt.zero_grad()
            except BaseException as e:  # surfaced by join_all
                trainer.error = e

        thread = threading.Thread(target=work, name=f"trainer-{trainer.index}", daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def join_all(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a trainer thread did not finish"
        for trainer in self.trainers:
            if trainer.error is not None:
                raise trainer.error

    def close(self) -> None:
        for trainer in self.trainers:
            trainer.stop.set()
        for thread in self.threads:
            thread.join(30)
        for trainer in self.trainers:
            if trainer.opt is not None:
                trainer.opt.shutdown()
        for dht in self.dhts:
            dht.shutdown()


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]
