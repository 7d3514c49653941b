"""The run's schedule of churn and faults, derived from the seed alone: same seed, same events.

Lifetimes are drawn per peer (exponential or Weibull); a dead peer comes back after ``rejoin_after``
(if set). Scheduled kills pick their victims among the peers alive at that moment and override their
lifetime schedule: a scheduled kill without ``rejoin_after`` is for good. The merged list
is then replayed once in time order so that no event kills a dead peer or revives a live one.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from hivesim.sim.topology import ChurnSpec, LifetimeSpec, Topology


@dataclass(order=True)
class Event:
    t: float
    action: str  # "kill" | "join" | "partition" | "heal"
    peer: str = ""
    mode: str = "abrupt"  # kill: abrupt | graceful
    identity: str = "fresh"  # join: fresh | same
    cause: str = ""  # "lifetime" | "scheduled" | "partition"
    peers: list[str] = field(default_factory=list)  # partition: the side cut off

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.peers:
            out.pop("peers")
        return out


def draw_lifetime(spec: LifetimeSpec, rng: random.Random) -> float:
    if spec.distribution == "exponential":
        return rng.expovariate(1.0 / spec.mean)  # type: ignore[operator]
    return rng.weibullvariate(spec.scale, spec.shape)  # type: ignore[arg-type]


def build_schedule(topology: Topology) -> list[Event]:
    rng = random.Random(f"{topology.seed}:schedule")
    churn: ChurnSpec = topology.churn
    duration = topology.duration
    churning = [
        f"{group}.{i}" for group, spec in topology.groups.items() if spec.churn for i in range(spec.count)
    ]
    events: list[Event] = []
    if churn.lifetime is not None:
        for peer in churning:
            t = topology.groups[peer.rsplit(".", 1)[0]].join_at
            while True:
                t += draw_lifetime(churn.lifetime, rng)
                if t >= duration:
                    break
                events.append(Event(t, "kill", peer, churn.mode, cause="lifetime"))
                if churn.rejoin_after is None:
                    break
                t += churn.rejoin_after
                if t >= duration:
                    break
                events.append(Event(t, "join", peer, identity=churn.identity, cause="lifetime"))

    for p in topology.faults.partitions:
        if p.groups is not None:
            side = [n for n in topology.peer_names() if n.split(".")[0] in p.groups]
        else:
            names = topology.peer_names()
            side = sorted(rng.sample(names, max(1, round(p.fraction * len(names)))))  # type: ignore[operator]
        events.append(Event(p.at, "partition", peers=side, cause="partition"))
        events.append(Event(p.at + p.duration, "heal", peers=side, cause="partition"))

    late = [f"{g}.{i}" for g, spec in topology.groups.items() if spec.join_at > 0 for i in range(spec.count)]
    for group, spec in topology.groups.items():
        if 0 < spec.join_at < duration:
            events += [Event(spec.join_at, "join", f"{group}.{i}", cause="join_at") for i in range(spec.count)]

    events.sort(key=lambda e: (e.t, e.action, e.peer))
    # Replay in time order; scheduled kills choose among the peers alive at their time.
    kills = sorted(churn.kills, key=lambda k: k.at)
    alive = set(topology.peer_names()) - set(late)
    final: list[Event] = []
    pending = list(events)
    while pending or kills:
        if kills and (not pending or kills[0].at <= pending[0].t):
            kill = kills.pop(0)
            if kill.peers is not None:
                victims = [p for p in kill.peers if p in alive]
            else:
                pool = sorted(p for p in alive if kill.group is None or p.startswith(f"{kill.group}."))
                victims = sorted(rng.sample(pool, min(len(pool), round(kill.fraction * len(pool)))))  # type: ignore[operator]
            rejoin = kill.rejoin_after
            # A scheduled kill overrides the victims' lifetime schedule: without a rejoin they are gone for
            # good (a named peer that is down at that moment too), with one they are back at kill.at + rejoin
            # and not before; the lifetime events after that rejoin stay.
            silenced = set(victims) | (set(kill.peers) if kill.peers is not None and rejoin is None else set())
            until = math.inf if rejoin is None else kill.at + rejoin
            pending = [e for e in pending if not (e.peer in silenced and kill.at <= e.t < until)] if silenced else pending
            for victim in victims:
                pending.append(Event(kill.at, "kill", victim, kill.mode or churn.mode, cause="scheduled"))
                if rejoin is not None and kill.at + rejoin < duration:
                    pending.append(Event(kill.at + rejoin, "join", victim, identity=churn.identity, cause="scheduled"))
            pending.sort(key=lambda e: (e.t, e.action != "kill", e.peer))
            continue
        event = pending.pop(0)
        if event.action == "kill":
            if event.peer not in alive:
                continue
            alive.discard(event.peer)
        elif event.action == "join":
            if event.peer in alive:
                continue
            alive.add(event.peer)
        final.append(event)
    return final
