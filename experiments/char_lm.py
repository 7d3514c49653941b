"""A small GPT-style byte-level language model on Python's own standard library, for collaborative training.

The same interface as ``experiments/train_digits.py`` (the ``trainer`` role loads it as
``model: experiments.char_lm``): ``make_model(seed)``, ``batches(shard, batch_size, seed, num_shards)``,
``loss(model, batch)``, ``evaluate(model)`` and ``shard_of(name, num_shards)``.

Data: the ``.py`` files of the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``,
``test/``, ``idlelib/``, ``site-packages/`` and friends left out), taken in sorted path order and
concatenated until ``CORPUS_BYTES`` (4 MB): the text ships with Python, nothing is downloaded, and the same
interpreter version gives the same bytes. The corpus is cut into 4 KiB blocks; every ``HELD_OUT_EVERY``-th
block (20th) is held out, the rest is training data, and training block ``i`` belongs to shard
``i % num_shards``: disjoint shards that cover the training set, a deterministic split.

Model: byte vocabulary (256), context ``CONTEXT`` (64), ``LAYERS`` (4) pre-norm transformer blocks of width
``WIDTH`` (128) with ``HEADS`` (4) causal attention heads and a 4x MLP, learned positions, tied
input/output embeddings: 834,304 parameters. One forward/backward at batch 16 takes ~70 ms on one core of
the 2-core development VM; ``evaluate`` ~110 ms.

Held-out loss (``evaluate``): mean next-byte cross-entropy (nats) over ``EVAL_SEQUENCES`` (64) fixed windows of
the held-out blocks: 5.33 at the start (ln 256 = 5.55), ~2.6 after 300 AdamW steps (lr 3e-3) alone. ``accuracy`` is next-byte accuracy.

Imports only the standard library and torch, so hivemind's venv can load it too (the study's hivemind peer).
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

CORPUS_BYTES = 4_000_000
BLOCK = 4096
HELD_OUT_EVERY = 20
CONTEXT = 64
LAYERS, WIDTH, HEADS = 4, 128, 4
VOCAB = 256
EVAL_SEQUENCES = 64
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}


def corpus_files(root: str | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by their path relative to ``root``."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in base.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(base).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


@lru_cache(maxsize=1)
def corpus() -> torch.Tensor:
    """The concatenated sources as a uint8 tensor, ``CORPUS_BYTES`` long (or shorter if the library is)."""
    chunks, size = [], 0
    for path in corpus_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= CORPUS_BYTES:
            break
    text = b"".join(chunks)[:CORPUS_BYTES]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


@lru_cache(maxsize=1)
def blocks() -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)``: ``[n, BLOCK]`` uint8 tensors of the corpus's whole blocks."""
    data = corpus()
    n = len(data) // BLOCK
    all_blocks = data[: n * BLOCK].view(n, BLOCK)
    held = torch.arange(n) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return all_blocks[~held], all_blocks[held]


def shard_of(name: str, num_shards: int) -> int:
    """``trainers.3`` -> shard 3 (mod ``num_shards``); other names by a stable hash."""
    tail = name.rsplit(".", 1)[-1]
    index = int(tail) if tail.isdigit() else zlib.crc32(name.encode())
    return index % max(1, num_shards)


def shard_blocks(shard: int, num_shards: int) -> torch.Tensor:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    train, _ = blocks()
    return train[shard::num_shards]


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, layers: int = LAYERS, width: int = WIDTH, heads: int = HEADS, context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        for name, p in self.named_parameters():  # GPT-2's initialisation, scaled residual projections
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.embed.weight.t()  # tied output embedding


def make_model(seed: int = 0) -> nn.Module:
    """The model, initialised from ``seed`` (the global RNG is left as it was)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return CharLM()
    finally:
        torch.random.set_rng_state(state)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batches(shard: int, batch_size: int, seed: int = 0, num_shards: int = 4) -> Iterator[torch.Tensor]:
    """Endless batches ``[batch_size, CONTEXT + 1]`` (int64) of random windows of this shard's blocks."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    data = shard_blocks(shard, num_shards)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(CONTEXT + 1)
    while True:
        rows = torch.randint(len(data), (batch_size,), generator=generator)
        starts = torch.randint(BLOCK - CONTEXT - 1, (batch_size,), generator=generator)
        yield data[rows[:, None], starts[:, None] + offsets].long()


def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


@lru_cache(maxsize=1)
def eval_batch() -> torch.Tensor:
    """``EVAL_SEQUENCES`` fixed windows spread over the held-out blocks."""
    _, held = blocks()
    generator = torch.Generator().manual_seed(1234)
    rows = torch.randint(len(held), (EVAL_SEQUENCES,), generator=generator)
    starts = torch.randint(BLOCK - CONTEXT - 1, (EVAL_SEQUENCES,), generator=generator)
    return held[rows[:, None], starts[:, None] + torch.arange(CONTEXT + 1)].long()


def evaluate(model: nn.Module) -> dict[str, float]:
    """Held-out next-byte cross-entropy (nats) and accuracy."""
    batch = eval_batch()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(batch[:, :-1])
            target = batch[:, 1:]
            value = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
            accuracy = (logits.argmax(-1) == target).float().mean()
    finally:
        model.train(was_training)
    return {"loss": float(value), "accuracy": float(accuracy)}
