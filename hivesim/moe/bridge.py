"""Where a torch module's network calls run: an event loop and an endpoint living in it.

Remote experts and mixtures are torch modules, called from ordinary (blocking) code: a training loop in
the main thread, or a role's training step running in an executor thread. Their RPCs are coroutines that
must run in the event loop that owns the endpoint; :class:`Bridge` submits them there and waits. Calling
from *inside* that loop would deadlock, so it raises a clear error instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from hivesim.net.rpc import Endpoint

T = TypeVar("T")


class Bridge:
    """An endpoint and the event loop it runs in."""

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self.endpoint = endpoint
        self.loop = loop

    @classmethod
    def resolve(cls, dht: Any = None, endpoint: Endpoint | None = None) -> "Bridge":
        """From a blocking ``DHT`` (its loop thread), a ``DHTNode`` or an ``Endpoint`` (the loop running
        now: build the module inside the peer's loop), or nothing (a private client endpoint)."""
        if dht is not None and hasattr(dht, "run_coroutine"):  # the blocking facade

            async def get_loop(_dht: Any, _node: Any) -> asyncio.AbstractEventLoop:
                return asyncio.get_running_loop()

            return cls(dht.node.endpoint, dht.run_coroutine(get_loop))
        if dht is not None:
            endpoint = dht.endpoint
        if endpoint is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError("with an async DHTNode or Endpoint, build the module inside its event loop "
                                   "(or pass the blocking hivesim.DHT)") from None
            return cls(endpoint, loop)
        return _client_bridge()

    def run(self, make: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Run ``await make()`` in the bridge's loop and return the result (blocking this thread)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            raise RuntimeError("a remote expert/mixture was called from its own event loop thread, which would "
                               "deadlock: run the torch step in an executor (loop.run_in_executor) instead")

        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)


_client_lock = threading.Lock()
_client: Bridge | None = None


def _client_bridge() -> Bridge:
    """A process-wide client endpoint in a daemon thread's loop, for experts called by address only."""
    global _client
    with _client_lock:
        if _client is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="hivesim-moe-client", daemon=True).start()
            endpoint = asyncio.run_coroutine_threadsafe(Endpoint().start(), loop).result(30)
            _client = Bridge(endpoint, loop)
        return _client
