"""A peer's training state as named tensors plus plain metadata: what a donor sends a newcomer.

Parameters are ``param.<i>``, extra tensors ``extra.<i>``, optimizer state tensors ``opt.<j>``; the
optimizer's and scheduler's ``state_dict`` become a msgpack-able skeleton in which each tensor is a
``{"__t": j}`` placeholder. Loading checks everything that came from the network before it replaces
anything: the same parameters (names, shapes, dtypes), optimizer state shaped like its parameter (or a
scalar), the same number of parameter groups, finite values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

_SCALARS = (int, float, str, bool, type(None))
MAX_DEPTH = 16


class StateMismatch(ValueError):
    """Downloaded state does not fit this peer's model or optimizer (the message says where)."""


def to_skeleton(obj: Any, tensors: list[torch.Tensor], depth: int = 0) -> Any:
    """``obj`` with every tensor moved to ``tensors`` and replaced by ``{"__t": index}``."""
    if depth > MAX_DEPTH:
        raise ValueError("state is nested too deeply to send")
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach().cpu().clone())
        return {"__t": len(tensors) - 1}
    if isinstance(obj, dict):
        return {k: to_skeleton(v, tensors, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_skeleton(v, tensors, depth + 1) for v in obj]
    if isinstance(obj, _SCALARS):
        return obj
    raise TypeError(f"cannot send {type(obj).__name__} in a training state (plain data and tensors only)")


def from_skeleton(obj: Any, tensors: Sequence[torch.Tensor], depth: int = 0) -> Any:
    """Undo :func:`to_skeleton`; placeholders pointing nowhere raise :class:`StateMismatch`."""
    if depth > MAX_DEPTH:
        raise StateMismatch("state is nested too deeply")
    if isinstance(obj, dict):
        if set(obj) == {"__t"}:
            index = obj["__t"]
            if not isinstance(index, int) or not 0 <= index < len(tensors):
                raise StateMismatch(f"state names tensor {index!r}, which was not sent")
            return tensors[index]
        return {k: from_skeleton(v, tensors, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_skeleton(v, tensors, depth + 1) for v in obj]
    if isinstance(obj, _SCALARS):
        return obj
    raise StateMismatch(f"unexpected {type(obj).__name__} in the state")


def check_params(received: dict[str, torch.Tensor], local: Sequence[torch.Tensor], prefix: str) -> list[torch.Tensor]:
    """The received ``<prefix>.<i>`` tensors, checked to match ``local`` one for one."""
    out = []
    for i, mine in enumerate(local):
        name = f"{prefix}.{i}"
        theirs = received.get(name)
        if theirs is None:
            raise StateMismatch(f"the donor sent no {name}")
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            raise StateMismatch(f"{name}: expected {mine.dtype} {list(mine.shape)}, got {theirs.dtype} {list(theirs.shape)}")
        out.append(theirs)
    extra = [n for n in received if n.startswith(prefix + ".") and n not in {f"{prefix}.{i}" for i in range(len(local))}]
    if extra:
        raise StateMismatch(f"the donor sent {len(extra)} {prefix} tensors this peer does not have")
    return out


def check_optimizer_state(state_dict: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A received optimizer ``state_dict`` that fits ``optimizer``: same groups and parameter counts, every
    per-parameter tensor shaped like its parameter or a scalar."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), list) \
            or not isinstance(state_dict.get("state"), dict):
        raise StateMismatch("the optimizer state needs 'state' and 'param_groups'")
    groups = state_dict["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise StateMismatch(f"{len(groups)} parameter groups received, this optimizer has {len(optimizer.param_groups)}")
    shapes: dict[int, torch.Size] = {}
    for theirs, mine in zip(groups, optimizer.param_groups):
        if not isinstance(theirs, dict) or not isinstance(theirs.get("params"), list) or len(theirs["params"]) != len(mine["params"]):
            raise StateMismatch("a parameter group has a different number of parameters")
        for index, p in zip(theirs["params"], mine["params"]):
            if not isinstance(index, int):
                raise StateMismatch("parameter ids must be integers")
            shapes[index] = p.shape
    for index, entries in state_dict["state"].items():
        if index not in shapes or not isinstance(entries, dict):
            raise StateMismatch(f"optimizer state for unknown parameter {index!r}")
        for name, value in entries.items():
            if isinstance(value, torch.Tensor) and value.numel() > 1 and value.shape != shapes[index]:
                raise StateMismatch(f"optimizer state {name!r} of parameter {index}: shape {list(value.shape)}, "
                                    f"parameter {list(shapes[index])}")
    return state_dict


def manifest_check(params: Sequence[torch.Tensor], extra: Sequence[torch.Tensor] = (), max_state_factor: int = 4
                   ) -> Callable[[list[str], list[tuple[int, ...]], list[torch.dtype]], None]:
    """A check of a donor's manifest before the download: its ``param.<i>`` / ``extra.<i>`` are exactly these
    tensors' shapes and dtypes, and its optimizer state (``opt.<j>``) holds at most ``max_state_factor`` times
    the parameters' size (Adam keeps two copies), so a lying donor cannot make this peer download gigabytes."""
    want = {f"param.{i}": (tuple(p.shape), p.dtype) for i, p in enumerate(params)}
    want.update({f"extra.{i}": (tuple(t.shape), t.dtype) for i, t in enumerate(extra)})
    budget = max_state_factor * sum(p.numel() * p.element_size() for p in params) + (1 << 20)

    def check(names: list[str], shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> None:
        got = {}
        other = 0
        for name, shape, dtype in zip(names, shapes, dtypes):
            if name in want:
                got[name] = (tuple(shape), dtype)
            elif name.startswith("opt."):
                other += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            else:
                raise StateMismatch(f"the donor's state names {name!r}, which this peer does not have")
        if got != want:
            wrong = sorted(n for n in want if got.get(n) != want[n])
            raise StateMismatch(f"the donor's tensors do not fit this model: {', '.join(wrong[:4])}")
        if other > budget:
            raise StateMismatch(f"the donor's optimizer state is {other} bytes, over the {budget} this model allows")

    return check
