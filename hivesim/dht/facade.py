"""``DHT``: a blocking facade over :class:`DHTNode`, shaped like hivemind's so its scripts port easily.

Nodes run in one background thread per process with its own event loop (no subprocess): every method
submits a coroutine there and waits for it, or returns a ``concurrent.futures.Future`` with
``return_future=True``. Sharing one loop among all the ``DHT`` objects of a process (a benchmark or a test
may start dozens) avoids a thread per node fighting over the GIL; the thread ends with the last node.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from hivesim.dht.node import DHTNode
from hivesim.dht.storage import ValueWithExpiration
from hivesim.dht.validation import RecordValidator

T = TypeVar("T")


class _SharedLoop:
    """A reference-counted event loop running in a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def acquire(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()
                    pending = asyncio.all_tasks(loop)
                    for task in pending:
                        task.cancel()
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                    loop.close()

                self._thread = threading.Thread(target=run, name="hivesim-dht-loop", daemon=True)
                self._thread.start()
                started.wait()
                self._loop = loop
            self._users += 1
            return self._loop

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._loop is None:
                return
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(30)


_shared_loop = _SharedLoop()


def normalize_initial_peers(initial_peers: str | Iterable[str] | None) -> list[str]:
    """``"tcp://..."`` or a list of them -> a list of addresses; a clear error for anything else.

    hivemind scripts pass one address as often as a list: a bare string used to be iterated character by
    character ("none of the initial peers answered: t, c, p, :, /"). Only the type and shape are checked
    here; whether an address answers is the bootstrap's business."""
    if initial_peers is None:
        return []
    if isinstance(initial_peers, str):
        initial_peers = [initial_peers]
    elif isinstance(initial_peers, (bytes, bytearray, memoryview)) or not isinstance(initial_peers, Iterable):
        raise TypeError(f"initial_peers must be an address or a list of addresses, got {initial_peers!r} "
                        f"({type(initial_peers).__name__})")
    out = []
    for i, address in enumerate(initial_peers):
        if not isinstance(address, str):
            raise TypeError(f"initial_peers[{i}] is {address!r} ({type(address).__name__}); "
                            "an address is a string such as dht.get_visible_addresses()[0]")
        if not address:
            raise ValueError(f"initial_peers[{i}] is an empty string")
        if address != address.strip() or any(c.isspace() for c in address):
            raise ValueError(f"initial_peers[{i}] is {address!r}: an address has no whitespace")
        out.append(address)
    return out


class DHT:
    """A DHT peer usable from ordinary (non-async) code.

    Args:
        initial_peers: addresses of running peers (what their :meth:`get_visible_addresses` returned), or one
            address as a string.
        host, port: where to listen (``port=0`` picks a free port).
        start: start right away; otherwise call :meth:`run_in_background`.
        client_mode: only make requests (a peer behind NAT); others never route to it.
        record_validators: e.g. :class:`~hivesim.dht.SchemaValidator`; owned keys are always signature-checked.
        **node_kwargs: passed to :meth:`DHTNode.create` (``bucket_size``, ``num_replicas``, ``rpc_timeout``...).
    """

    def __init__(
        self,
        initial_peers: str | Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        start: bool = True,
        client_mode: bool = False,
        record_validators: Iterable[RecordValidator] = (),
        startup_timeout: float = 60.0,
        **node_kwargs: Any,
    ) -> None:
        self.initial_peers = normalize_initial_peers(initial_peers)
        self._kwargs = dict(host=host, port=port, client_mode=client_mode, record_validators=list(record_validators), **node_kwargs)
        self.startup_timeout = startup_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._node: DHTNode | None = None
        self._owned = True
        if start:
            self.run_in_background()

    @classmethod
    def attach(cls, node: DHTNode, loop: asyncio.AbstractEventLoop) -> "DHT":
        """A blocking view of a node that already runs in ``loop`` (a :class:`~hivesim.Peer`'s): code in
        another thread (a training loop) uses it like any ``DHT``; :meth:`shutdown` leaves the node running."""
        self = cls.__new__(cls)
        self.initial_peers = []
        self._kwargs = {}
        self.startup_timeout = 0.0
        self._node, self._loop, self._owned = node, loop, False
        return self

    def run_in_background(self) -> None:
        """Start the node in the shared background loop and wait until it has joined the DHT."""
        if self._node is not None:
            return
        self._loop = _shared_loop.acquire()
        future = asyncio.run_coroutine_threadsafe(DHTNode.create(self.initial_peers, **self._kwargs), self._loop)
        try:
            self._node = future.result(self.startup_timeout)
        except BaseException:
            future.cancel()
            _shared_loop.release()
            self._loop = None
            raise

    @property
    def is_alive(self) -> bool:
        return self._node is not None and self._loop is not None

    @property
    def node(self) -> DHTNode:
        if self._node is None or not self.is_alive:
            raise RuntimeError("the DHT is not running")
        return self._node

    @property
    def peer_id(self) -> bytes:
        return self.node.peer_id

    @property
    def public_key(self) -> bytes:
        """This peer's Ed25519 public key; put ``owner_marker(dht.public_key)`` in keys only it may write."""
        return self.node.public_key

    def get_visible_addresses(self) -> list[str]:
        """Addresses other peers pass as ``initial_peers`` to join through this one."""
        return [self.node.address]

    def get_visible_maddrs(self) -> list[str]:
        """hivemind's name for :meth:`get_visible_addresses` (hivesim addresses are strings, not multiaddrs)."""
        return self.get_visible_addresses()

    def _submit(self, coro: Any, return_future: bool, timeout: float | None = None) -> Any:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop and not return_future:
            coro.close()
            raise RuntimeError("a blocking DHT call from the DHT's own event loop would wait forever: "
                               "call it from another thread, or await the node's coroutine instead")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future if return_future else future.result(timeout)

    def store(
        self, key: Any, value: Any, expiration_time: float, subkey: Any = None, *, return_future: bool = False
    ) -> bool | Future:
        """Store ``value`` under ``key`` (and ``subkey``) until ``expiration_time`` (see :func:`get_dht_time`)."""
        return self._submit(self.node.store(key, value, expiration_time, subkey), return_future)

    def get(self, key: Any, latest: bool = False, *, return_future: bool = False) -> ValueWithExpiration | None | Future:
        """The newest value found under ``key``; for subkeys ``.value`` is ``{subkey: ValueWithExpiration}``."""
        return self._submit(self.node.get(key, latest=latest), return_future)

    def store_many(self, items: Iterable[tuple], *, return_future: bool = False) -> dict | Future:
        return self._submit(self.node.store_many(list(items)), return_future)

    def get_many(self, keys: Iterable[Any], latest: bool = False, *, return_future: bool = False) -> dict | Future:
        return self._submit(self.node.get_many(list(keys), latest=latest), return_future)

    def run_coroutine(self, fn: Callable[["DHT", DHTNode], Any], return_future: bool = False) -> Any:
        """Run ``await fn(dht, node)`` in the node's event loop and return its result."""

        async def call() -> Any:
            return await fn(self, self.node)

        return self._submit(call(), return_future)

    def shutdown(self) -> None:
        """Stop the node (idempotent); the shared loop thread ends with the last node of the process."""
        node, loop = self._node, self._loop
        if node is None or loop is None:
            return
        self._node = self._loop = None
        if not self._owned:
            return
        try:
            asyncio.run_coroutine_threadsafe(node.shutdown(), loop).result(30)
        finally:
            _shared_loop.release()

    def __enter__(self) -> "DHT":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if sys.is_finalizing():
            return  # the loop thread is frozen at interpreter exit: a shutdown would wait 30 s for nothing
        try:
            self.shutdown()
        except Exception:
            pass
