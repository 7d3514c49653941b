"""Refusing MoE requests from their header, before their tensors arrive.

A tensor above the endpoint's inline limit is streamed: its request's header (the msgpack body, with
each tensor's dtype and shape, and every buffer's size) comes first, and the bytes follow in chunks that
the receiver copies into a buffer it allocates for them. Checking a request's rows only in the handler
means the server has already received and held all of it (a 4 million row request cost 1.1 GiB before it
was refused). :class:`RequestGuard` checks what the header declares instead: the total bytes against
``max_request_bytes``, and each tensor's dtype, shape and rows against the expert's schema and the row
limit. A refused request is answered with a ``BadMessage`` error at once; its chunks then find no stream
and are dropped as they come (counted in the endpoint's ``dropped_stray_chunks``), so nothing of it is
held.

The guard is the endpoint's admission hook for the forward and backward methods
(``Endpoint.register(name, handler, admit=guard.check)``), which runs before anything is allocated.
Requests small enough to travel inline have already arrived whole when the header is read; the handlers
check those, with their own typed errors.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from hivesim.net.errors import BadMessage
from hivesim.net.serialization import EXT_NDARRAY, EXT_TENSOR

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


@dataclass(frozen=True)
class DeclaredTensor:
    """What a request's header says about one of its tensors (its bytes may not have arrived)."""

    dtype: str
    shape: tuple[int, ...]


def _declared(code: int, data: bytes) -> Any:
    """msgpack ext hook: a tensor's descriptor instead of the tensor (no buffer is touched)."""
    if code not in (EXT_TENSOR, EXT_NDARRAY):
        raise BadMessage(f"unknown extension type {code}")
    desc = msgpack.unpackb(data, raw=False)
    if code == EXT_NDARRAY or not isinstance(desc, list) or len(desc) != 5:
        return DeclaredTensor("ndarray", ())
    _, dtype, shape, _, _ = desc
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadMessage("bad tensor descriptor")
    return DeclaredTensor(dtype, tuple(shape))


def check_declared(payload: Any, backends: Mapping[str, Any], max_rows: int) -> None:
    """Raise BadMessage unless a forward/backward request's declared tensors fit its expert.

    ``payload`` is the request body with :class:`DeclaredTensor` in place of tensors."""
    if not isinstance(payload, dict):
        raise BadMessage("a request must be a map")
    uid = payload.get("uid")
    backend = backends.get(uid) if isinstance(uid, str) else None
    if backend is None:
        raise BadMessage(f"no expert {uid!r} on this server")
    rows = None
    for name, row_shape in (("x", backend.sample_shape), ("g", backend.output_shape or backend.sample_shape)):
        if name not in payload:
            continue
        t = payload[name]
        if not isinstance(t, DeclaredTensor) or t.dtype not in _FLOAT_DTYPES:
            raise BadMessage(f"{name!r} must be a floating point tensor")
        if len(t.shape) != 1 + len(row_shape) or tuple(t.shape[1:]) != tuple(row_shape):
            raise BadMessage(f"{name!r} must have shape [batch, {', '.join(map(str, row_shape))}], got {list(t.shape)}")
        if not 0 < t.shape[0] <= max_rows:
            raise BadMessage(f"a request carries 1..{max_rows} samples, {name!r} declares {t.shape[0]}")
        if rows is not None and t.shape[0] != rows:
            raise BadMessage(f"'g' declares {t.shape[0]} rows, 'x' {rows}")
        rows = t.shape[0]


class RequestGuard:
    """Refuses streamed requests whose header declares too much or the wrong tensors.

    Args:
        max_bytes: most bytes one request may declare, all its buffers and body together.
        admit: ``admit(payload)`` raises BadMessage for a request whose declared tensors do not fit.
    """

    def __init__(self, max_bytes: int, admit: Callable[[Any], None]) -> None:
        self.max_bytes = int(max_bytes)
        self.admit = admit
        self.stats: Counter[str] = Counter()

    def check(self, header: dict, peer_id: bytes | None = None) -> None:
        """Raise BadMessage (answered to the caller at once) for a request not worth receiving: the
        endpoint's admission hook (``Endpoint.register(..., admit=guard.check)``)."""
        if not header.get("S"):
            return  # everything arrived inline already: the handler checks it with its typed errors
        sizes, body = header.get("L"), header.get("b", b"")
        if not isinstance(sizes, list) or not all(type(n) is int and n >= 0 for n in sizes) or not isinstance(body, bytes):
            return  # malformed: the endpoint's own checks refuse it
        declared = sum(sizes) + len(body)
        try:
            if declared > self.max_bytes:
                raise BadMessage(f"the request declares {declared} bytes, more than the {self.max_bytes} "
                                 "this expert server accepts")
            try:
                payload = msgpack.unpackb(body, ext_hook=_declared, raw=False, strict_map_key=False)
            except BadMessage:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable body is refused, never raised further
                raise BadMessage(f"malformed request body: {type(e).__name__}") from None
            self.admit(payload)
        except BadMessage:
            self.stats["refused_before_receiving"] += 1
            self.stats["refused_bytes"] += declared
            raise
        except Exception:  # noqa: BLE001 - a bug here must not break the endpoint's reader
            logger.exception("moe request guard failed; letting the request through to the handler")


def default_max_request_bytes(backends: Mapping[str, Any], max_rows: int) -> int:
    """Room for the largest legitimate request: ``max_rows`` float64 rows of input and output gradient
    (the widest dtype clients may send), plus 1 MiB for the body."""
    widest = max((math.prod(b.sample_shape) + math.prod(b.output_shape or b.sample_shape) for b in backends.values()),
                 default=0)
    return max_rows * widest * 8 + (1 << 20)
