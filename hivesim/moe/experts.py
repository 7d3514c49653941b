"""Expert types a server can host, by name: ``ffn``, ``residual_ffn``, ``transformer``, ``delay``.

An expert is an ordinary ``torch.nn.Module`` mapping one tensor ``[batch, *shape]`` to one tensor of
the same leading size. Servers build experts by name (``make_expert("ffn", hidden_dim=1024)``) so that a
topology file or a command line can name them; a custom type is one decorated class away::

    @register_expert_class("my_expert", sample_shape=lambda hid: (hid,))
    class MyExpert(nn.Module):
        def __init__(self, hidden_dim: int): ...
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertClass:
    """A registered expert type: how to build it and what one input sample looks like."""

    name: str
    factory: Callable[..., nn.Module]
    sample_shape: Callable[[int], tuple[int, ...]]  # hidden_dim -> shape of one sample (no batch dim)
    # hidden_dim -> shape of one output row; None: the same as the input sample (every built-in type).
    # Servers refuse gradients and clients refuse outputs that do not have it, so it must be right.
    output_shape: Callable[[int], tuple[int, ...]] | None = None


EXPERT_CLASSES: dict[str, ExpertClass] = {}


def register_expert_class(name: str, sample_shape: Callable[[int], tuple[int, ...]] | None = None,
                          output_shape: Callable[[int], tuple[int, ...]] | None = None) -> Callable:
    """Class decorator: make ``name`` buildable by :func:`make_expert`. The class takes ``hidden_dim``
    (plus any keyword arguments) in its constructor; ``sample_shape(hidden_dim)`` is one sample's shape and
    ``output_shape(hidden_dim)`` one output row's (default: the sample's)."""

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name in EXPERT_CLASSES and EXPERT_CLASSES[name].factory is not cls:
            raise ValueError(f"an expert class named {name!r} is already registered")
        EXPERT_CLASSES[name] = ExpertClass(name, cls, sample_shape or (lambda hid: (hid,)), output_shape)
        return cls

    return register


def make_expert(name: str, hidden_dim: int, **kwargs: Any) -> nn.Module:
    """Build a registered expert type."""
    if name not in EXPERT_CLASSES:
        raise ValueError(f"unknown expert class {name!r}; registered: {sorted(EXPERT_CLASSES)}")
    return EXPERT_CLASSES[name].factory(hidden_dim, **kwargs)


def sample_shape(name: str, hidden_dim: int) -> tuple[int, ...]:
    if name not in EXPERT_CLASSES:
        raise ValueError(f"unknown expert class {name!r}; registered: {sorted(EXPERT_CLASSES)}")
    return tuple(EXPERT_CLASSES[name].sample_shape(hidden_dim))


def output_shape(name: str, hidden_dim: int) -> tuple[int, ...]:
    """The shape of one output row of a registered expert type (its schema: what clients accept)."""
    if name not in EXPERT_CLASSES:
        raise ValueError(f"unknown expert class {name!r}; registered: {sorted(EXPERT_CLASSES)}")
    known = EXPERT_CLASSES[name]
    return tuple((known.output_shape or known.sample_shape)(hidden_dim))


@register_expert_class("ffn")
class FeedforwardExpert(nn.Module):
    """hid -> 4 hid -> hid with GELU, a residual connection and LayerNorm (the benchmark's expert)."""

    def __init__(self, hidden_dim: int, ff_dim: int | None = None) -> None:
        super().__init__()
        ff_dim = ff_dim or 4 * hidden_dim
        self.ffn = nn.Linear(hidden_dim, ff_dim)
        self.ffn_output = nn.Linear(ff_dim, hidden_dim)
        self.layer_norm = nn.LayerNorm(hidden_dim, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.ffn_output(nn.functional.gelu(self.ffn(x), approximate="tanh")))


@register_expert_class("residual_ffn")
class ResidualFFNExpert(nn.Module):
    """The learning@home MNIST expert, scalable: x + FFN(LayerNorm(x)) with two hidden layers."""

    def __init__(self, hidden_dim: int, ff_dim: int | None = None) -> None:
        super().__init__()
        ff_dim = ff_dim or 4 * hidden_dim
        self.net = nn.Sequential(
            nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, ff_dim), nn.ReLU(),
            nn.Linear(ff_dim, ff_dim), nn.ReLU(), nn.Linear(ff_dim, hidden_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


@register_expert_class("transformer", sample_shape=lambda hid: (16, hid))
class TransformerExpert(nn.Module):
    """One pre-norm transformer encoder block over ``[batch, seq, hid]`` (no dropout: experts are
    recomputed in backward, which must see the same function as forward)."""

    def __init__(self, hidden_dim: int, num_heads: int = 4, ff_dim: int | None = None) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(hidden_dim, num_heads, ff_dim or 4 * hidden_dim, dropout=0.0,
                                                batch_first=True, norm_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@register_expert_class("delay")
class DelayExpert(nn.Module):
    """For tests and latency studies: ``x * scale`` after sleeping ``delay`` seconds per batch.

    ``scale`` is a parameter, so backward has a gradient and the optimizer a step to take."""

    def __init__(self, hidden_dim: int, delay: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.delay = float(delay)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay > 0:
            time.sleep(self.delay)
        return x * self.scale
