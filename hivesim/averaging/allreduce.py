"""Butterfly all-reduce inside an assembled group, tolerant to members that die or stall.

The flattened vector is cut into one part per member (sizes from the load-balancing shares). Every
member that contributes (not auxiliary) sends part ``j`` of its vector, with its weight, to member
``j``; member ``j`` accumulates the weighted sum of its part as contributions arrive and, once every
expected sender has contributed or been given up on, answers each sender's call with the average. The
average travels back as the *reply* to the sender's call, so a dead reducer shows up as a failed call
and a dead sender as a missing contribution: either way the round goes on without it.

Bounded everywhere: a reducer waits for contributions until its reduce deadline, a sender waits for an
answer until the all-reduce timeout. A part whose reducer failed keeps the local values; a contribution
that arrives after its part was averaged is refused (and the sender keeps its local values), which keeps
the sum of all peers' values unchanged whatever fails. Large tensors are decoded and accumulated on an
executor thread, not in the event loop.

Big vectors avoid fresh memory, whose first touch (page faults) costs more than the copies: an averaged
part streams straight into its place in the sender's vector, and weight-1 contributions accumulate in
place in the reducer's own part. A reply that breaks off mid-stream leaves that range half written: the
report lists it in ``spoiled`` and the caller keeps its own values there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch

from hivesim.averaging.matchmaking import BadRequest, BanList, GroupInfo
from hivesim.averaging.partition import DEFAULT_MAX_SHARE, group_shares, part_sizes
from hivesim.averaging.robust import Aggregation, aggregate
from hivesim.net.codecs import NONE, Codec, get_codec
from hivesim.net.errors import PeerUnreachable, RPCError, RPCTimeout
from hivesim.net.rpc import CallContext, Endpoint

logger = logging.getLogger(__name__)

OFFLOAD_NUMEL = 1 << 20  # tensors above this many elements are decoded / accumulated off the event loop
UNKNOWN_GROUP_WAIT = 2.0  # how long a contribution for a group this peer has not started yet may wait
FaultHook = Callable[[str, "Reduction"], Awaitable[None]]


def encode(tensor: torch.Tensor, codec: Codec) -> dict[str, Any]:
    payload, meta = codec.encode(tensor)
    return {"c": codec.name, "m": meta, "d": payload, "n": int(tensor.numel())}


def decode(wire: Any, expected: int) -> torch.Tensor:
    """A float32 vector of ``expected`` elements from an encoded part; BadRequest for anything else."""
    if not isinstance(wire, dict) or not isinstance(wire.get("c"), str) or not isinstance(wire.get("m"), dict):
        raise BadRequest("a part needs a codec, its metadata and data")
    data = wire.get("d")
    if wire.get("n") != expected or not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise BadRequest(f"a part of {expected} elements was expected")
    try:
        codec = get_codec(wire["c"])
        out = codec.decode(data, wire["m"], torch.float32, (expected,))
    except Exception as e:
        raise BadRequest(f"cannot decode the part: {e}") from None
    if not bool(torch.isfinite(out).all()):
        raise BadRequest("the part holds NaN or infinite values")
    return out


MAX_WEIGHT_RATIO = 16.0  # most a member's weight may exceed the median declared weight of its group


def weight_caps(members: list[dict[str, Any]], ratio: float = MAX_WEIGHT_RATIO) -> list[float]:
    """The most weight each member's contributions may carry: what it declared when it joined (its signed
    ticket), and at most ``ratio`` times the (lower) median of the group's positive declarations, so a
    member declaring 1e30 cannot outweigh everyone. Members that declared nothing are not capped."""
    declared = [m.get("w") for m in members]
    positive = sorted(w for w in declared if isinstance(w, (int, float)) and w > 0)
    ceiling = ratio * positive[(len(positive) - 1) // 2] if positive else math.inf
    return [min(float(w), ceiling) if isinstance(w, (int, float)) else math.inf for w in declared]


def part_bounds(sizes: list[int], index: int) -> tuple[int, int]:
    start = sum(sizes[:index])
    return start, start + sizes[index]


@dataclass
class Reduction:
    """This member's side of one all-reduce round."""

    group: GroupInfo
    sizes: list[int]
    local: torch.Tensor | None  # this member's flat snapshot (None once released)
    weight: float
    codec: Codec
    senders: set[int]  # member indices expected to contribute to my part (incl. me if I contribute)
    accumulated: torch.Tensor | None
    weight_sum: float = 0.0
    contributed: set[int] = field(default_factory=set)
    given_up: set[int] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: torch.Tensor | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.TimerHandle | None = None
    hook_task: asyncio.Task | None = None
    serving: int = 0  # contribution handlers of this round still running
    finished: bool = False  # this member's own run of the round is over
    aggregation: Aggregation = field(default_factory=Aggregation)
    contributions: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # robust rules: kept, not summed
    closing: bool = False  # no contribution is taken any more (a robust result is being computed)
    weight_caps: list[float] = field(default_factory=list)  # per member: the most weight its part may carry

    def release(self) -> None:
        """Drop the round's tensors once nothing uses them any more. The last rounds stay known (late
        contributions get a clear refusal), and each would otherwise hold on to a whole vector: 16 copies
        of the model per averager."""
        if self.finished and self.serving == 0:
            self.local = self.accumulated = self.result = None
            self.contributions = []

    @property
    def my_index(self) -> int:
        return self.group.my_index

    def bounds(self, index: int) -> tuple[int, int]:
        return part_bounds(self.sizes, index)

    @property
    def complete(self) -> bool:
        return self.senders <= (self.contributed | self.given_up)


@dataclass
class RoundReport:
    """What one all-reduce achieved, from this member's point of view."""

    group_size: int
    averaged_fraction: float  # share of the vector that came back averaged with at least one other peer
    failed_members: list[int]
    seconds: float
    bytes_sent: int
    part_sizes: list[int]
    # ranges of the returned vector that hold neither local nor averaged values (a reply that broke off
    # while streaming into it): the caller keeps its own values there
    spoiled: list[tuple[int, int]] = field(default_factory=list)


class AllReduce:
    """Runs rounds and serves other members' contributions (one per averager, on its endpoint)."""

    def __init__(self, endpoint: Endpoint, name: str, bans: BanList, hook: FaultHook | None = None,
                 aggregation: "str | Aggregation | None" = None) -> None:
        self.endpoint = endpoint
        self.name = name
        self.bans = bans
        self.hook = hook
        self.aggregation = Aggregation.of(aggregation)  # how this member reduces its part
        self.max_share = DEFAULT_MAX_SHARE  # the most of a round's vector one member reduces
        self.rounds: OrderedDict[bytes, Reduction] = OrderedDict()
        self._expected: dict[bytes, asyncio.Event] = {}
        self.stats = {"late_contributions": 0, "bad_contributions": 0, "bad_replies": 0, "impostor_parts": 0,
                      "clamped_weights": 0}

    @property
    def method(self) -> str:
        return f"{self.name}.part"

    def register(self) -> None:
        self.endpoint.register(self.method, self._rpc_part)

    def unregister(self) -> None:
        self.endpoint.unregister(self.method)

    # ------------------------------------------------------------------ running a round

    async def run(self, group: GroupInfo, flat: torch.Tensor, weight: float, *, codec: Codec = NONE,
                  timeout: float = 30.0, contribute: bool = True) -> tuple[torch.Tensor, RoundReport]:
        """Average ``flat`` (a float32 vector, identical length on every member) within ``group``.

        Returns the new vector (local values where a part could not be averaged) and a report.
        """
        started = time.monotonic()
        # every member sizes the parts itself from the member list (bandwidths clamped, shares capped): a
        # leader's or a member's lie about bandwidth does not hand one member the whole vector
        sizes = part_sizes(int(flat.numel()), group_shares(group.members, self.max_share))
        me = group.my_index
        senders = {i for i, m in enumerate(group.members) if not m["aux"]}
        start, end = part_bounds(sizes, me)
        robust = self.aggregation.robust
        if robust:  # contributions are kept whole and combined at the end
            accumulated = None
        elif contribute and weight == 1.0:  # the common case accumulates in place: no fresh memory to fault in
            accumulated = flat[start:end]
        else:  # (a weight-0 contribution must not wipe the local values that stand in if nobody else sends)
            accumulated = torch.zeros(sizes[me], dtype=torch.float32)
            if contribute:
                accumulated.add_(flat[start:end], alpha=weight)
        state = Reduction(group, sizes, flat, weight, codec, senders, accumulated, aggregation=self.aggregation,
                          # a robust rule counts nobody for more than a typical member
                          weight_caps=weight_caps(group.members, 1.0 if robust else MAX_WEIGHT_RATIO))
        if contribute:
            state.weight_sum += weight
            state.contributed.add(me)
            if robust and weight > 0:
                state.contributions.append((weight, flat[start:end]))
        else:
            state.senders.discard(me)
        self.rounds[group.group_id] = state
        while len(self.rounds) > 16:
            _, old = self.rounds.popitem(last=False)
            self._finalize(old)
        waiter = self._expected.pop(group.group_id, None)
        if waiter is not None:
            waiter.set()
        loop = asyncio.get_running_loop()
        state.timer = loop.call_later(max(0.05, 0.5 * timeout), self._finalize, state)
        if state.complete:
            self._finalize(state)
        out = flat  # averaged parts overwrite the snapshot in place (each after its own part was sent)
        averaged = [False] * group.size
        failed: list[int] = []
        spoiled: list[tuple[int, int]] = []
        sent = [0]

        async def exchange(j: int) -> None:
            start, end = state.bounds(j)
            part = encode(flat[start:end], codec)
            sent[0] += int(part["d"].numel())
            member = group.members[j]
            landing = out[start:end].view(torch.uint8) if codec is NONE else None
            used = []

            def into(index: int, nbytes: int) -> torch.Tensor | None:
                # the averaged part streams straight into the place it belongs (our part has left by then:
                # the reducer answers only after it received all of it)
                if landing is None or index != 0 or nbytes != landing.numel() or used:
                    return None
                used.append(True)
                return landing

            try:
                reply = await self.endpoint.call(member["addr"], self.method,
                                                 {"gid": group.group_id, "from": me, "w": weight, "part": part},
                                                 timeout=max(0.1, timeout - (time.monotonic() - started)), into=into)
                if not isinstance(reply, dict):
                    raise BadRequest("reply is not a mapping")
                averaged_part = await offload(decode, reply.get("part"), end - start)
                if averaged_part.data_ptr() != out[start:end].data_ptr():
                    out[start:end] = averaged_part
                averaged[j] = bool(reply.get("n", 0) > 1)
            except (PeerUnreachable, RPCTimeout) as e:
                logger.debug("member %d (%s) failed: %r", j, member["addr"], e)
                failed.append(j)
                self.bans.ban(member["id"])
                self._give_up(state, j)
            except BadRequest as e:  # the reducer's answer is unusable (malformed, wrong size, not finite)
                logger.debug("member %d (%s) answered with a bad part: %r", j, member["addr"], e)
                self.stats["bad_replies"] += 1
                failed.append(j)
                self.bans.ban(member["id"])
            except RPCError as e:
                logger.debug("member %d (%s) could not average our part: %r", j, member["addr"], e)
                failed.append(j)
            if used and j in failed:
                spoiled.append((start, end))

        tasks = [exchange(j) for j in range(group.size) if j != me and sizes[j] > 0 and contribute]
        try:
            if sizes[me] > 0:
                tasks.append(self._own_part(state, out, averaged, contribute))
            await asyncio.gather(*tasks)
        finally:
            if state.timer:
                state.timer.cancel()
            self._finalize(state)
            state.finished = True
            state.release()
        total = max(1, int(flat.numel()))
        fraction = sum(sizes[j] for j in range(group.size) if averaged[j]) / total
        report = RoundReport(group.size, fraction, sorted(failed), time.monotonic() - started, sent[0], sizes, spoiled)
        return out, report

    async def _own_part(self, state: Reduction, out: torch.Tensor, averaged: list[bool], contribute: bool) -> None:
        await state.done.wait()
        if state.hook_task is not None:
            await asyncio.shield(state.hook_task)
        if contribute and state.result is not None:
            start, end = state.bounds(state.my_index)
            if state.result.data_ptr() != out[start:end].data_ptr():
                out[start:end] = state.result
            averaged[state.my_index] = len(state.contributed) > 1

    def _give_up(self, state: Reduction, index: int) -> None:
        """Stop waiting for ``index``'s contribution (it failed us)."""
        if index in state.senders and index not in state.contributed:
            state.given_up.add(index)
            if state.complete:
                self._finalize(state)

    def _finalize(self, state: Reduction) -> None:
        if state.done.is_set() or state.closing:
            return
        state.closing = True
        if state.timer:
            state.timer.cancel()
        if state.aggregation.robust and state.contributions:
            task = asyncio.get_running_loop().create_task(self._robust_result(state))
            state.hook_task = task  # awaited (shielded) by whoever waits for the result
            return
        if state.weight_sum > 0 and state.accumulated is not None:
            state.result = state.accumulated.div_(state.weight_sum)
        else:
            start, end = state.bounds(state.my_index)
            state.result = state.local[start:end] if state.my_index in state.senders else None
        self._publish(state)

    async def _robust_result(self, state: Reduction) -> None:
        """Combine the kept contributions by the robust rule (off the loop for big parts), then publish."""
        weights = torch.tensor([w for w, _ in state.contributions], dtype=torch.float32)
        stacked = torch.stack([c for _, c in state.contributions])
        try:
            state.result = await offload(aggregate, stacked, weights, state.aggregation, numel=stacked.numel())
        except Exception:  # a bug here must not hang the round: fall back to the local values
            logger.exception("robust aggregation failed")
            start, end = state.bounds(state.my_index)
            state.result = state.local[start:end] if state.local is not None else None
        state.contributions = []
        state.hook_task = None
        self._publish(state)
        if state.hook_task is not None:
            await state.hook_task

    def _publish(self, state: Reduction) -> None:
        if self.hook is not None:
            state.hook_task = asyncio.get_running_loop().create_task(self.hook("reduced", state))
        state.done.set()

    # ------------------------------------------------------------------ serving contributions

    async def _rpc_part(self, payload: Any, ctx: CallContext) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("gid"), bytes) or len(payload["gid"]) > 64:
            raise BadRequest("a part needs a group id")
        sender, weight = payload.get("from"), payload.get("w")
        if not isinstance(sender, int) or isinstance(sender, bool):
            raise BadRequest("a part needs the sender's index")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise BadRequest("a part needs a finite non-negative weight")
        gid = payload["gid"]
        state = self.rounds.get(gid)
        if state is None:
            state = await self._wait_for_round(gid, min(UNKNOWN_GROUP_WAIT, ctx.time_left))
        me = state.my_index
        if sender == me or sender not in state.senders:
            raise BadRequest(f"member {sender} does not contribute to this part")
        if ctx.peer_id is not None and ctx.peer_id != state.group.members[sender]["id"]:
            self.stats["impostor_parts"] += 1  # a part is from whoever the connection proved, not the payload
            raise BadRequest(f"you are not member {sender} of this group")
        if sender in state.contributed:
            raise BadRequest(f"member {sender} already contributed")
        cap = state.weight_caps[sender]
        if weight > cap:  # more than it declared when it joined, or far above the group's other members
            self.stats["clamped_weights"] += 1
            weight = cap
        state.serving += 1
        try:
            return await self._reduce_part(state, sender, float(weight), payload, ctx)
        finally:
            state.serving -= 1
            state.release()

    async def _reduce_part(self, state: Reduction, sender: int, weight: float, payload: dict[str, Any],
                           ctx: CallContext) -> dict[str, Any]:
        try:
            part = await offload(decode, payload.get("part"), state.sizes[state.my_index])
        except BadRequest:
            self.stats["bad_contributions"] += 1
            raise
        if state.done.is_set() or state.closing:
            self.stats["late_contributions"] += 1
            raise BadRequest("too late: this part was already averaged without you")
        async with state.lock:
            if state.done.is_set() or state.closing:
                self.stats["late_contributions"] += 1
                raise BadRequest("too late: this part was already averaged without you")
            if state.aggregation.robust:
                if weight > 0:
                    state.contributions.append((weight, part))
            else:
                await offload(state.accumulated.add_, part, alpha=weight, numel=part.numel())
            del part  # give a big contribution's memory back before waiting for the others
            payload.pop("part", None)
            state.weight_sum += weight
            state.contributed.add(sender)
            state.given_up.discard(sender)
        if state.complete:
            self._finalize(state)
        try:
            await asyncio.wait_for(state.done.wait(), max(0.0, ctx.time_left))
        except asyncio.TimeoutError:
            raise BadRequest("the part was not averaged in time") from None
        if state.hook_task is not None:
            await asyncio.shield(state.hook_task)
        if state.result is None:
            raise BadRequest("nothing to average: every contribution had weight 0")
        return {"part": encode(state.result, state.codec), "n": len(state.contributed)}

    async def _wait_for_round(self, gid: bytes, wait: float) -> Reduction:
        if gid not in self._expected:
            if len(self._expected) >= 64:
                raise BadRequest("unknown group")
            self._expected[gid] = asyncio.Event()
        event = self._expected[gid]
        try:
            await asyncio.wait_for(event.wait(), wait)
        except asyncio.TimeoutError:
            self._expected.pop(gid, None)
            raise BadRequest("unknown group") from None
        state = self.rounds.get(gid)
        if state is None:
            raise BadRequest("unknown group")
        return state


async def offload(fn: Callable[..., Any], *args: Any, numel: int | None = None, **kwargs: Any) -> Any:
    """Run ``fn`` inline for small work, on the default executor for big tensors."""
    size = numel
    if size is None:
        first = args[-1] if args else 0
        size = first if isinstance(first, int) else 0
    if size < OFFLOAD_NUMEL:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: fn(*args, **kwargs))
