"""``RemoteExpert``: a torch module whose forward and backward run on an expert server.

Calling it sends ``moe.forward`` with the input; autograd's backward sends ``moe.backward`` with the
input and the output gradient, and gets the input gradient back (the server also updates the expert).
Failures surface as :class:`ExpertError` subclasses: :class:`ExpertTimeout`, :class:`ExpertUnreachable`,
:class:`ExpertFailed` (the server answered with an error, e.g. an unknown uid or a wrong shape).

Servers are not trusted either: a reply is accepted only if it is a floating point tensor of the expected
shape (the request's rows, the expert's output row shape) with finite values; anything else raises
:class:`ExpertFailed` with ``remote_type == "BadReply"``, which a mixture treats like a dead expert.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hivesim.moe.bridge import Bridge
from hivesim.moe.server import BACKWARD, FORWARD, INFO
from hivesim.net.errors import PeerUnreachable, RemoteError, RPCError, RPCTimeout
from hivesim.net.rpc import Endpoint


class ExpertError(RuntimeError):
    """A remote expert call failed; ``uid`` says which expert."""

    def __init__(self, uid: str, message: str) -> None:
        self.uid = uid
        super().__init__(f"expert {uid}: {message}")


class ExpertTimeout(ExpertError, TimeoutError):
    """The server did not answer in time."""


class ExpertUnreachable(ExpertError, ConnectionError):
    """The server could not be reached (dead, wrong address)."""


class ExpertFailed(ExpertError):
    """The server answered with an error; ``remote_type`` is its type name (``UnknownExpert``...)."""

    def __init__(self, uid: str, message: str, remote_type: str = "") -> None:
        self.remote_type = remote_type
        super().__init__(uid, message)


def as_expert_error(uid: str, error: BaseException) -> ExpertError:
    if isinstance(error, ExpertError):
        return error
    if isinstance(error, (RPCTimeout, TimeoutError)):
        return ExpertTimeout(uid, str(error) or "timed out")
    if isinstance(error, PeerUnreachable):
        return ExpertUnreachable(uid, str(error))
    if isinstance(error, RemoteError):
        return ExpertFailed(uid, error.remote_message, error.remote_type)
    if isinstance(error, RPCError):
        return ExpertFailed(uid, str(error), type(error).__name__)
    return ExpertFailed(uid, repr(error), type(error).__name__)


def checked_reply(uid: str, reply: Any, key: str, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
    """``reply[key]`` if it is a finite floating point tensor of exactly ``shape`` (cast to ``dtype``);
    else :class:`ExpertFailed` ("BadReply"): a server's reply is never trusted to be well formed."""
    t = reply.get(key) if isinstance(reply, dict) else None
    if not isinstance(t, torch.Tensor):
        raise ExpertFailed(uid, f"the server's {what} reply has no tensor {key!r}", "BadReply")
    if not t.is_floating_point():
        raise ExpertFailed(uid, f"the server's {what} is {t.dtype}, not floating point", "BadReply")
    if tuple(t.shape) != tuple(shape):
        raise ExpertFailed(uid, f"the server's {what} has shape {list(t.shape)}, expected {list(shape)}", "BadReply")
    if not bool(torch.isfinite(t).all()):
        raise ExpertFailed(uid, f"the server's {what} has NaN or inf values", "BadReply")
    return t.to(dtype)


async def call_forward(endpoint: Endpoint, uid: str, address: str, x: torch.Tensor, timeout: float | None,
                       output_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """One forward RPC; typed errors. The output must be ``[len(x), *output_shape]`` (default: ``x``'s
    sample shape), floating point and finite."""
    try:
        reply = await endpoint.call(address, FORWARD, {"uid": uid, "x": x}, timeout=timeout)
    except Exception as e:
        raise as_expert_error(uid, e) from None
    row = tuple(x.shape[1:]) if output_shape is None else tuple(output_shape)
    return checked_reply(uid, reply, "y", (x.shape[0], *row), x.dtype, "forward output")


async def call_backward(endpoint: Endpoint, uid: str, address: str, x: torch.Tensor, grad: torch.Tensor,
                        timeout: float | None) -> torch.Tensor:
    """One backward RPC; typed errors. The input gradient must have ``x``'s shape and be finite."""
    try:
        reply = await endpoint.call(address, BACKWARD, {"uid": uid, "x": x, "g": grad}, timeout=timeout)
    except Exception as e:
        raise as_expert_error(uid, e) from None
    return checked_reply(uid, reply, "gx", tuple(x.shape), x.dtype, "input gradient")


# Always requires grad, so autograd calls backward (and the expert learns) even when the input does not.
_DUMMY = torch.empty(0, requires_grad=True)


class _RemoteCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, _dummy: torch.Tensor, x: torch.Tensor, expert: "RemoteExpert") -> torch.Tensor:  # type: ignore[override]
        x = x.detach().cpu().contiguous()
        ctx.expert = expert
        ctx.save_for_backward(x)
        shape = expert._output_shape()
        return expert._bridge.run(lambda: call_forward(expert._bridge.endpoint, expert.uid, expert.address, x,
                                                       expert.forward_timeout, shape),
                                  expert._wait(expert.forward_timeout))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        expert: RemoteExpert = ctx.expert
        grad = grad.detach().cpu().contiguous()
        gx = expert._bridge.run(lambda: call_backward(expert._bridge.endpoint, expert.uid, expert.address, x, grad,
                                                      expert.backward_timeout), expert._wait(expert.backward_timeout))
        return None, gx, None


class RemoteExpert(nn.Module):
    """An expert hosted by a server, used like a local module (forward and backward).

    Args:
        uid: the expert's uid on the server, e.g. ``"ffn.3.14"``.
        address: the server's address (``tcp://host:port``).
        dht: optional blocking ``DHT`` or ``DHTNode`` whose endpoint makes the calls; otherwise a
            process-wide client endpoint is used.
        forward_timeout, backward_timeout: seconds to wait for the server (default 30).
        output_shape: the shape of one output row, which replies must have; default: asked from the
            server once (``moe.info``) and kept.
    """

    def __init__(self, uid: str, address: str, *, dht: Any = None, endpoint: Endpoint | None = None,
                 forward_timeout: float | None = None, backward_timeout: float | None = None,
                 output_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.uid = uid
        self.address = address
        self.output_shape = tuple(output_shape) if output_shape is not None else None
        self.forward_timeout = forward_timeout if forward_timeout is not None else 30.0
        self.backward_timeout = backward_timeout if backward_timeout is not None else 30.0
        self._bridge = Bridge.resolve(dht, endpoint)

    @staticmethod
    def _wait(timeout: float) -> float:
        return timeout + 5.0  # the RPC enforces the timeout; this only guards against a stuck loop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _RemoteCall.apply(_DUMMY, x, self)
        return y.to(x.device)

    def _output_shape(self) -> tuple[int, ...]:
        """The output row shape replies are checked against (asked from the server on first use)."""
        if self.output_shape is None:
            shape = self.info().get("output_shape")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise ExpertFailed(self.uid, f"the server describes the expert's output as {shape!r}", "BadReply")
            self.output_shape = tuple(shape)
        return self.output_shape

    def info(self) -> dict[str, Any]:
        """What the server says about the expert (type, hidden size, sample shape, calls served)."""

        async def ask() -> dict[str, Any]:
            try:
                reply = await self._bridge.endpoint.call(self.address, INFO, {"uid": self.uid}, timeout=self.forward_timeout)
            except Exception as e:
                raise as_expert_error(self.uid, e) from None
            if not isinstance(reply, dict):
                raise ExpertFailed(self.uid, "the server's info reply is not a map", "BadReply")
            return reply

        return self._bridge.run(ask, self._wait(self.forward_timeout))

    def extra_repr(self) -> str:
        return f"uid={self.uid!r}, address={self.address!r}"
