"""Message bodies: msgpack for structure, raw buffers for tensors and arrays; nothing is ever pickled.

``pack(obj)`` walks any msgpack-able structure; every ``torch.Tensor`` or ``numpy.ndarray`` in it is
replaced by a msgpack extension that describes it (buffer index, dtype, shape, codec and the codec's
small metadata) while its bytes go to a separate buffer list. The RPC layer sends those buffers as
their own ZeroMQ frames without copying them, and ``unpack`` rebuilds the tensors on top of the
received frames, again without copying where possible.

torch is imported only when a message carries buffers: a process that only exchanges plain messages
(a DHT node) never loads it, which saves about 300 MiB per process when hundreds of peers are packed
into a few processes.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from typing import TYPE_CHECKING

import msgpack
import numpy as np

from hivesim.net.errors import BadMessage

if TYPE_CHECKING:
    import torch

    from hivesim.net.codecs import Codec

EXT_TENSOR = 1
EXT_NDARRAY = 2

_DTYPE_NAMES = (
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
    "int8", "uint8", "int16", "int32", "int64", "bool", "uint16", "uint32", "uint64",
)
_dtype_tables: tuple[dict, dict] | None = None


def _torch_dtypes() -> tuple[dict[str, "torch.dtype"], dict["torch.dtype", str]]:
    """(dtype by name, name by dtype), built on first use: importing torch is deferred until then."""
    global _dtype_tables
    if _dtype_tables is None:
        import torch

        by_name = {name: getattr(torch, name) for name in _DTYPE_NAMES if hasattr(torch, name)}
        _dtype_tables = by_name, {dtype: name for name, dtype in by_name.items()}
    return _dtype_tables


def __getattr__(name: str) -> Any:  # TORCH_DTYPES stays importable without importing torch up front
    if name == "TORCH_DTYPES":
        return _torch_dtypes()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_NUMPY_KINDS = set("biufc")  # bool, int, uint, float, complex: never object or void

Buffer = Any  # anything with the buffer protocol: bytes, memoryview, zmq.Frame.buffer, uint8 tensor


class Packed:
    """A packed message body: msgpack bytes plus the raw buffers its extensions point to."""

    __slots__ = ("body", "buffers")

    def __init__(self, body: bytes, buffers: list["torch.Tensor"]) -> None:
        self.body = body
        self.buffers = buffers  # 1-D contiguous uint8 tensors

    @property
    def nbytes(self) -> int:
        return len(self.body) + sum(int(b.numel()) for b in self.buffers)


class _HasBuffers(Exception):
    """Raised by the plain packer on a tensor or array: that message takes the full path."""


def _plain_default(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    raise _HasBuffers


_local = threading.local()


def _plain_packer() -> msgpack.Packer:
    """This thread's reusable packer for messages without buffers (most RPCs): building a Packer per
    message costs more than packing a small message."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(default=_plain_default, use_bin_type=True)
    return packer


def pack(obj: Any, compression: Any = None) -> Packed:
    """Pack ``obj``; ``compression`` is None, a codec name, a Codec or a SizeAdaptiveCompression."""
    try:
        return Packed(_plain_packer().pack(obj), [])
    except Exception:  # tensors, arrays, or something unsendable: the full path packs or explains it
        pass  # (a msgpack Packer drops its partial output on an exception)
    import torch

    from hivesim.net.codecs import as_policy

    _, dtype_names = _torch_dtypes()
    policy: list[Callable[[torch.Tensor], Codec]] = []  # resolved on the first tensor: most messages have none
    buffers: list[torch.Tensor] = []

    def default(value: Any) -> msgpack.ExtType:
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            if tensor.dtype not in dtype_names:
                raise TypeError(f"cannot send tensors of dtype {tensor.dtype}")
            if not policy:
                policy.append(as_policy(compression))
            codec = policy[0](tensor)
            payload, meta = codec.encode(tensor)
            buffers.append(payload)
            desc = [len(buffers) - 1, dtype_names[tensor.dtype], list(tensor.shape), codec.name, meta]
            return msgpack.ExtType(EXT_TENSOR, msgpack.packb(desc, use_bin_type=True))
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in _NUMPY_KINDS:
                raise TypeError(f"cannot send numpy arrays of dtype {value.dtype} (only plain numbers)")
            array = value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d arrays 0-d
            buffers.append(torch.from_numpy(array.reshape(-1).view(np.uint8)) if array.size else torch.empty(0, dtype=torch.uint8))
            desc = [len(buffers) - 1, array.dtype.str, list(array.shape)]
            return msgpack.ExtType(EXT_NDARRAY, msgpack.packb(desc, use_bin_type=True))
        if isinstance(value, (tuple, set, frozenset)):
            return list(value)
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"cannot send objects of type {type(value).__name__}")



    body = msgpack.packb(obj, default=default, use_bin_type=True)
    return Packed(body, buffers)


def as_uint8(buffer: Buffer) -> "torch.Tensor":
    """View any buffer as a 1-D uint8 tensor without copying."""
    import torch

    if isinstance(buffer, torch.Tensor):
        return buffer.reshape(-1).view(torch.uint8)
    view = memoryview(buffer)
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if not view.readonly:
        return torch.frombuffer(view, dtype=torch.uint8)
    # ZeroMQ frames are read-only to Python but writable memory in fact; torch's warning is noise here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def _no_buffers_hook(code: int, data: bytes) -> Any:
    if code in (EXT_TENSOR, EXT_NDARRAY):
        raise BadMessage("extension refers to a buffer of 0")
    raise BadMessage(f"unknown extension type {code}")


def unpack(body: bytes, buffers: Sequence[Buffer]) -> Any:
    """Rebuild what :func:`pack` packed. Raises :class:`BadMessage` on anything inconsistent."""
    if not buffers:  # most messages: no tensors, so no views or hooks to set up
        try:
            return msgpack.unpackb(body, ext_hook=_no_buffers_hook, raw=False, strict_map_key=False)
        except BadMessage:
            raise
        except Exception as e:
            raise BadMessage(f"malformed message body: {type(e).__name__}: {e}") from None
    views = [as_uint8(b) for b in buffers]  # buffers mean tensors or arrays: torch is needed from here on
    used: set[int] = set()

    def take(index: Any) -> torch.Tensor:
        if not isinstance(index, int) or not 0 <= index < len(views) or index in used:
            raise BadMessage(f"extension refers to buffer {index!r} of {len(views)}")
        used.add(index)
        return views[index]

    def ext_hook(code: int, data: bytes) -> Any:
        try:
            desc = msgpack.unpackb(data, raw=False)
        except Exception as e:
            raise BadMessage(f"unreadable tensor descriptor: {e}") from None
        if code == EXT_TENSOR:
            return _decode_tensor(desc, take)
        if code == EXT_NDARRAY:
            return _decode_ndarray(desc, take)
        raise BadMessage(f"unknown extension type {code}")

    try:
        return msgpack.unpackb(body, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except BadMessage:
        raise
    except Exception as e:  # msgpack's own errors on truncated or malformed bytes
        raise BadMessage(f"malformed message body: {type(e).__name__}: {e}") from None


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadMessage(f"bad shape {shape!r}")
    return tuple(shape)


def _decode_tensor(desc: Any, take: Callable[[Any], "torch.Tensor"]) -> "torch.Tensor":
    import torch

    from hivesim.net.codecs import NONE, get_codec

    if not isinstance(desc, list) or len(desc) != 5:
        raise BadMessage("bad tensor descriptor")
    index, dtype_name, shape, codec_name, meta = desc
    dtype = _torch_dtypes()[0].get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise BadMessage(f"unknown tensor dtype {dtype_name!r}")
    shape = _check_shape(shape)
    if not isinstance(codec_name, str) or not isinstance(meta, dict):
        raise BadMessage("bad codec in tensor descriptor")
    try:
        codec = get_codec(codec_name)
    except ValueError as e:
        raise BadMessage(str(e)) from None
    payload = take(index)
    numel = 1
    for d in shape:
        numel *= d
    if codec is NONE:
        itemsize = torch.empty((), dtype=dtype).element_size()
        if payload.numel() != numel * itemsize:
            raise BadMessage(f"tensor of shape {list(shape)} {dtype_name} needs {numel * itemsize} bytes, got {payload.numel()}")
    try:
        tensor = codec.decode(payload, meta, dtype, shape)
    except BadMessage:
        raise
    except Exception as e:
        raise BadMessage(f"cannot decode {codec_name} tensor: {e}") from None
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        raise BadMessage(f"{codec_name} payload does not match shape {list(shape)}")
    return tensor


def _decode_ndarray(desc: Any, take: Callable[[Any], "torch.Tensor"]) -> np.ndarray:
    if not isinstance(desc, list) or len(desc) != 3 or not isinstance(desc[1], str):
        raise BadMessage("bad array descriptor")
    index, dtype_str, shape = desc
    try:
        dtype = np.dtype(dtype_str)
    except TypeError:
        raise BadMessage(f"unknown array dtype {dtype_str!r}") from None
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise BadMessage(f"refusing array dtype {dtype_str!r}")
    shape = _check_shape(shape)
    payload = take(index)
    numel = 1
    for d in shape:
        numel *= d
    if payload.numel() != numel * dtype.itemsize:
        raise BadMessage(f"array of shape {list(shape)} {dtype_str} needs {numel * dtype.itemsize} bytes, got {payload.numel()}")
    if numel == 0:
        return np.empty(shape, dtype=dtype)
    return payload.numpy().view(dtype).reshape(shape)
