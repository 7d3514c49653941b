import msgpack
import numpy as np
import pytest
import torch

from hivesim.net import BadMessage, pack, unpack
from hivesim.net.serialization import EXT_TENSOR

DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
]


def roundtrip(obj, compression=None):
    packed = pack(obj, compression)
    # what the receiver gets are read-only frames: give it bytes, as the wire does
    return unpack(packed.body, [bytes(b.numpy()) for b in packed.buffers])


def sample(dtype, shape):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    return torch.randint(0, 100, shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (), (0,), (2, 0, 3), (7,)])
def test_tensor_roundtrip_is_exact(dtype, shape):
    tensor = sample(dtype, shape)
    out = roundtrip(tensor)
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_tensors(dtype):
    base = sample(dtype, (6, 8))
    for view in (base.t(), base[:, ::3], base[1:4, 2:5].t()):
        assert not view.is_contiguous()
        out = roundtrip(view)
        assert torch.equal(out, view) and out.shape == view.shape


def test_requires_grad_and_nested_structures():
    weight = torch.randn(4, 4, requires_grad=True)
    obj = {"w": weight, "list": [1, "two", b"three", None, 4.5, [torch.arange(3)]], "tuple": (1, 2)}
    out = roundtrip(obj)
    assert torch.equal(out["w"], weight.detach()) and not out["w"].requires_grad
    assert out["list"][:5] == [1, "two", b"three", None, 4.5]
    assert torch.equal(out["list"][5][0], torch.arange(3))
    assert out["tuple"] == [1, 2]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex128, np.float16])
def test_numpy_roundtrip(dtype):
    array = (np.random.default_rng(0).standard_normal((5, 3)) * 10).astype(dtype)
    out = roundtrip({"a": array, "t": array.T, "empty": np.zeros((0, 2), dtype), "scalar": np.array(3, dtype)})
    assert out["a"].dtype == array.dtype and np.array_equal(out["a"], array)
    assert np.array_equal(out["t"], array.T)
    assert out["empty"].shape == (0, 2)
    assert out["scalar"].shape == () and out["scalar"] == np.array(3, dtype)
    out["a"][...] = array  # decoded arrays are ordinary writable arrays
    assert out["a"].flags.writeable


def test_buffers_are_zero_copy_for_contiguous_tensors():
    tensor = torch.randn(1000)
    packed = pack(tensor)
    assert packed.buffers[0].data_ptr() == tensor.data_ptr()


def test_no_pickle_objects_are_refused():
    class Thing:
        pass

    with pytest.raises(TypeError):
        pack({"x": Thing()})
    with pytest.raises(TypeError):
        pack(np.array([object()], dtype=object))


def test_malformed_bodies_raise_bad_message():
    packed = pack({"t": torch.arange(10)})
    buffers = [bytes(b.numpy()) for b in packed.buffers]
    with pytest.raises(BadMessage):
        unpack(packed.body[:-3], buffers)  # truncated
    with pytest.raises(BadMessage):
        unpack(packed.body, [buffers[0][:-8]])  # buffer shorter than the shape says
    with pytest.raises(BadMessage):
        unpack(packed.body, [])  # refers to a missing buffer
    with pytest.raises(BadMessage):
        unpack(b"\xc1\xc1\xc1", [])  # never-used msgpack byte
    lie = msgpack.packb(msgpack.ExtType(EXT_TENSOR, msgpack.packb([0, "float32", [10**12], "none", {}])))
    with pytest.raises(BadMessage):
        unpack(lie, buffers)  # shape that claims 4 TB
    evil = msgpack.packb(msgpack.ExtType(EXT_TENSOR, msgpack.packb([0, "object", [1], "none", {}])))
    with pytest.raises(BadMessage):
        unpack(evil, buffers)
    with pytest.raises(BadMessage):
        unpack(msgpack.packb(msgpack.ExtType(99, b"")), [])


def test_compression_is_applied_per_tensor():
    big = torch.randn(100_000)
    small = torch.randn(10)
    ints = torch.arange(100_000)
    packed = pack({"big": big, "small": small, "ints": ints}, "float16")
    sizes = [int(b.numel()) for b in packed.buffers]
    assert sizes[0] == 2 * big.numel()  # float16: half of float32
    out = unpack(packed.body, [bytes(b.numpy()) for b in packed.buffers])
    assert out["big"].dtype == torch.float32
    assert torch.allclose(out["big"], big, atol=1e-2, rtol=1e-3)
    assert torch.equal(out["ints"], ints)  # lossy codecs never touch integer tensors
