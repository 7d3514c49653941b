"""Collaborative training under churn: trainer peers train one model together with ``hivesim.Optimizer``.

The workload role is the built-in ``trainer`` (``hivesim/roles/trainer.py``; its params are the
workload's: ``model``, ``run_id``, ``target_batch_size``, ``batch_size``, ``lr``, ``optimizer_opts``...), so
any model module (``experiments/train_digits.py`` and its like) runs under it. A ``monitor`` peer, if the
topology has one, reads the swarm's progress from the DHT and logs one line per epoch.
``topologies/train_quickstart.yaml``: four trainers and a monitor; one trainer dies abruptly and a
newcomer joins later, downloading the state.

``summarize`` gives the headline numbers from the samples: epochs reached per trainer and how far apart
the trainers that lived to the end ended up, held-out loss at the start and at the end, how many epoch
transitions averaged with others, the traffic per epoch, and, for every peer that joined during the run,
whether it downloaded the state and at which epoch it started. The figure is ``analysis/collaborative_training.py``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from hivesim.roles.trainer import TrainerRole

ROLE = TrainerRole


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def summarize(run: Any) -> dict[str, Any]:
    samples = run.samples if hasattr(run, "samples") else run["samples"]
    events = run.events if hasattr(run, "events") else run.get("events", [])
    by_peer: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for s in sorted(samples, key=lambda s: s["t"]):
        by_peer[s["peer"]][s["name"]].append(s)
    trainers = sorted(p for p, named in by_peer.items() if named.get("eval") or named.get("epoch") or named.get("train_loss"))
    if not trainers:
        return {"trainers": 0}
    killed = {e["peer"] for e in events if e.get("action") == "kill"}
    joins = [(e["peer"], e["wall"]) for e in events if e.get("action") == "join" and e.get("ok", True) and "wall" in e]

    final_epoch = {p: max((s["value"] for s in by_peer[p]["epoch"]), default=0) for p in trainers}
    survivors = [p for p in trainers if p not in killed]
    transitions = [s for p in trainers for s in by_peer[p]["epoch"] if not s.get("downloaded")]
    with_company = [s for s in transitions if s.get("expected_peers", 0) >= 2]
    initial = [s["value"] for p in trainers for s in by_peer[p]["eval"][:1] if s.get("epoch") == 0]
    final = [by_peer[p]["eval"][-1] for p in survivors if by_peer[p]["eval"]]
    out: dict[str, Any] = {
        "trainers": len(trainers),
        "epochs_max": max(final_epoch.values()),
        "final_epochs": final_epoch,
        "final_epoch_spread": (max(final_epoch[p] for p in survivors) - min(final_epoch[p] for p in survivors)) if survivors else None,
        "initial_test_loss": _mean(initial),
        "final_test_loss": _mean([s["value"] for s in final]),
        "final_test_accuracy": _mean([s["accuracy"] for s in final if s.get("accuracy") is not None]),
        "transitions": len(transitions),
        "averaged_share": round(sum(bool(s.get("averaged")) for s in with_company) / len(with_company), 4) if with_company else None,
        "mean_group_size": _mean([s["group_size"] for s in with_company if s.get("averaged")]),
        "bytes_sent_per_epoch": _mean([s.get("bytes_sent", 0) for s in transitions]),
        "bytes_received_per_epoch": _mean([s.get("bytes_received", 0) for s in transitions]),
        "state_downloads": {p: max(s.get("state_downloads", 0) for s in by_peer[p]["epoch"])
                            for p in trainers if any(s.get("state_downloads", 0) for s in by_peer[p]["epoch"])},
    }
    if out["initial_test_loss"] is not None and out["final_test_loss"] is not None:
        out["loss_went_down"] = out["final_test_loss"] < out["initial_test_loss"]
    newcomers: dict[str, Any] = {}
    for peer, wall in joins:
        if peer not in by_peer:
            continue
        after = [s for s in by_peer[peer]["epoch"] if s["t"] >= wall]
        newcomers[peer] = {
            "joined_at": wall,
            "first_epoch": after[0]["value"] if after else None,
            "downloaded_state": any(s.get("downloaded") for s in after),
            "state_downloads": max((s.get("state_downloads", 0) for s in after), default=0),
            "final_epoch": after[-1]["value"] if after else None,
        }
    if newcomers:
        out["newcomers"] = newcomers
    lines = [s for named in by_peer.values() for s in named.get("monitor_epoch", [])]
    if lines:
        out["monitor"] = {"epoch_lines": len(lines), "last_epoch": max(s["value"] for s in lines),
                          "last_loss": next((s["loss"] for s in reversed(sorted(lines, key=lambda s: s["t"]))
                                             if s.get("loss") is not None), None)}
    return out


def headline(run: Any) -> str:
    epochs = run.named("epoch")[-16:]
    evals = run.named("eval")[-8:]
    if not epochs and not evals:
        return "training: starting"
    epoch = max((s["value"] for s in epochs), default=0)
    loss = np.mean([s["value"] for s in evals]) if evals else float("nan")
    return f"epoch {epoch}  held-out loss {loss:.3f}"
