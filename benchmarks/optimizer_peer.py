"""One peer of ``bench_optimizer.py``'s collaborative training job, on hivemind or on hivesim.

    python benchmarks/optimizer_peer.py --lib hivemind|hivesim --index I --peers N [--initial-peers ADDR ...]
        [--run-id R --epochs 10 --batch 32 --matchmaking-time 3 --timeout 30 --time-limit 600]

hivesim's ``Optimizer`` has hivemind's public API, so the same code drives both: only the import differs.
The peer speaks one JSON object per line on stdout (logs go to stderr):

1. peer 0 only: ``{"address": [...]}``, the addresses other peers join with;
2. ``{"ready": ...}`` once its DHT and optimizer exist and it made ``--warmup-steps`` (1) unmeasured steps
   (forward, backward, ``opt.step()``: far from an epoch's worth, but they make the peer report progress,
   which is how hivemind's progress tracker learns that it exists: a peer that has not stepped yet is
   invisible to the others); then it waits for a line ``go`` on stdin, so that every peer starts training
   together (an early peer alone would otherwise run epochs by itself);
3. ``{"result": ...}`` when ``opt.local_epoch >= --epochs`` or ``--time-limit`` s after ``go`` (also printed by a
   watchdog if a call to ``opt.step()`` is still blocked 10 s later: ``"stuck_in_step": true``, and every thread's
   stack goes to stderr); then it keeps its DHT and optimizer running, idle (or, with ``--keep-training``,
   still training, unmeasured), for peers still finishing (to average with, or to load the state from) until
   it reads ``exit`` or stdin closes, and shuts down.

The result: ``samples`` (processed in forward/backward after go), ``compute_s`` (seconds in forward and
backward only, padded to ``--step-time`` if set: ``opt.step()`` and ``opt.zero_grad()`` are the library's
share), ``first_step_at`` (wall clock), ``epochs``: one record per change of ``opt.local_epoch`` seen after
``opt.step()`` (``epoch``: the new value, ``at``: wall clock, ``compute_s``: forward/backward seconds since the
previous change, ``samples``, ``train_loss``: mean over those steps, ``averaged``, ``group``, ``source``,
``fingerprint``: random projections of the parameters, see ``optimizer_job.Fingerprint``), ``test``: loss
and accuracy on the held-out set, ``rss_mib``: this process's peak (VmHWM), ``tree_rss_mib``: the peak of
the sum of the resident sets of this process and its descendants (hivemind's DHT process and p2p daemon;
an upper bound: pages shared after a fork count in each process), ``processes``: how many that tree held.

Did the peer average at an epoch? The same definition for both libraries: *the gradients that made this
epoch's optimizer step were averaged with at least one other peer* (``averaged``: True, False or None
when no signal was seen). Where it comes from (``source``):

* ``attr``: hivesim's ``opt.last_averaging_ok`` (with ``opt.last_epoch_report.group_size`` where present),
  read right after the step that changed the epoch, when the attribute exists and is not None; if
  ``opt.last_epoch_report.epoch`` is not the epoch just left, the change had no averaging round of its own
  (the peer loaded the state) -> False;
* ``log``: otherwise the optimizer's own status messages, captured from the ``hivemind.optim`` /
  ``hivesim.optim`` loggers at DEBUG level (what ``verbose=True`` would print): ``Averaged gradients with N
  peers`` -> True (``group`` = N), ``Skipped averaging`` / ``Averaging gradients failed`` -> False; a change
  of epoch with no averaging message (hivemind says nothing when its tracker sees no other peer, and
  ``Peer is out of sync`` / ``Catching up`` when the peer downloaded the state or skipped ahead instead)
  -> False, provided that these loggers emitted anything at all so far;
* ``none``: neither: ``averaged`` is None.

A second, library-neutral check is left to the driver: how far apart the peers' parameters are right after
reaching an epoch (``fingerprint``); averaging with everyone keeps them together.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from functools import partial
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import optimizer_job as job  # noqa: E402

AVERAGED = re.compile(r"Averaged gradients with (\d+) peers")
NOT_AVERAGED = re.compile(r"Skipped averaging|Averaging gradients failed")
CAUGHT_UP = re.compile(r"Peer is out of sync|Catching up with collaboration step")


class AveragingLog(logging.Handler):
    """Collects the optimizer's averaging status messages since the last :meth:`take`; records of level
    WARNING and above still reach stderr."""

    def __init__(self, echo: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.echo = echo  # every record to stderr, DEBUG included (--debug)
        self.events: list[tuple[str, int | None]] = []
        self.records = 0  # every record the optimizer's loggers emitted: is its status stream there at all?
        self.events_lock = threading.Lock()  # not self.lock: Handler.handle holds that one around emit
        self.stderr = logging.StreamHandler(sys.stderr)
        self.stderr.setLevel(logging.DEBUG)
        self.stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            return
        self.records += 1
        event = None
        if (m := AVERAGED.search(message)) is not None:
            event = ("averaged", int(m.group(1)))
        elif NOT_AVERAGED.search(message):
            event = ("not_averaged", None)
        elif CAUGHT_UP.search(message):
            event = ("caught_up", None)
        if event is not None:
            with self.events_lock:
                self.events.append(event)
        if record.levelno >= logging.WARNING or self.echo:
            self.stderr.handle(record)

    def take(self) -> list[tuple[str, int | None]]:
        with self.events_lock:
            events, self.events = self.events, []
        return events

    def install(self, names: list[str]) -> None:
        for name in names:
            logger = logging.getLogger(name)
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
            logger.propagate = False  # DEBUG status lines would otherwise flood the library's own handler


def averaging_outcome(opt: Any, events: list[tuple[str, int | None]], log_alive: bool) -> tuple[bool | None, int | None, str]:
    """``(averaged, group size, source)`` of the epoch change that just happened (see the module docstring)."""
    ok = getattr(opt, "last_averaging_ok", None)
    if ok is not None:
        report = getattr(opt, "last_epoch_report", None)  # hivesim: the transition it describes, its group size
        if getattr(report, "epoch", None) is not None and report.epoch != opt.local_epoch - 1:
            return False, None, "attr"  # stale: this change of epoch (loading the state) had no averaging round
        group = getattr(report, "group_size", None)
        return bool(ok), (int(group) if isinstance(group, int) else None), "attr"
    groups = [n for kind, n in events if kind == "averaged" and n is not None]
    if groups:
        group = groups[-1]
        return group >= 2, group, "log"
    if any(kind in ("not_averaged", "caught_up") for kind, _ in events) or log_alive:
        return False, None, "log"
    return None, None, "none"


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", choices=["hivemind", "hivesim"], required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--run-id", default="bench_optimizer")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--matchmaking-time", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=30.0, help="averaging_timeout")
    parser.add_argument("--time-limit", type=float, default=600.0, help="stop training this many s after go")
    parser.add_argument("--step-time", type=float, default=0.0,
                        help="pad each forward/backward to at least this many s by sleeping (counted as compute)")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="full steps (forward, backward, opt.step) before ready, not measured")
    parser.add_argument("--keep-training", action="store_true",
                        help="after the result, go on training (unmeasured) until exit instead of idling")
    parser.add_argument("--debug", action="store_true", help="the optimizer's DEBUG records to stderr too")
    parser.add_argument("--linger", type=float, default=300.0, help="after the result, wait at most this long for exit")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # N peers share the machine's cores
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: every thread's stack to stderr
    log = AveragingLog(echo=args.debug)
    log.install([f"{args.lib}.optim"])
    if args.lib == "hivemind":
        from hivemind import DHT, Optimizer

        dht = DHT(initial_peers=args.initial_peers, start=True)
        addresses = [str(a) for a in dht.get_visible_maddrs()]
    else:
        from hivesim import DHT, Optimizer

        dht = DHT(initial_peers=args.initial_peers, start=True)
        addresses = [str(a) for a in dht.get_visible_addresses()]
    if args.index == 0:
        say({"address": addresses})

    x_train, y_train, x_test, y_test = job.load_data()
    x, y = job.shard(x_train, y_train, args.index, args.peers)
    batches = job.Batches(x, y, args.batch, seed=args.index)
    model = job.make_model()
    opt = Optimizer(dht=dht, run_id=args.run_id, target_batch_size=args.peers * 4 * args.batch,
                    batch_size_per_step=args.batch, optimizer=partial(torch.optim.Adam, lr=1e-3),
                    params=model.parameters(), matchmaking_time=args.matchmaking_time,
                    averaging_timeout=args.timeout, verbose=False)
    rss = job.TreeRSSSampler(period=2.0)
    fingerprint = job.Fingerprint(model)

    def forward_backward(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        if args.step_time > 0:  # stand-in for a slower accelerator: waits, leaves the cores to the other peers
            time.sleep(max(0.0, args.step_time - (time.perf_counter() - t0)))
        return loss

    for _ in range(args.warmup_steps):  # announces this peer to the others' progress trackers (see --warmup-steps)
        forward_backward(*batches.next())
        opt.step()
        opt.zero_grad()
    say({"ready": args.index, "shard": len(x), "lib": args.lib, "pid": os.getpid(), "epoch": opt.local_epoch})

    if sys.stdin.readline().strip() != "go":
        return
    state: dict[str, Any] = {"samples": 0, "compute_s": 0.0, "first_step_at": None, "epochs": [],
                             "start_epoch": opt.local_epoch, "errors": []}
    printed = threading.Lock()
    done = threading.Event()

    def report(stuck: bool) -> bool:
        if not printed.acquire(blocking=False):
            return False
        rss.sample()
        rss.stop()
        say({"result": {**state, "index": args.index, "ended_at": job.now(), "lib": args.lib, "final_epoch": opt.local_epoch,
                        "finished": opt.local_epoch >= args.epochs, "stuck_in_step": stuck,
                        "test": job.evaluate(model, x_test, y_test), "rss_mib": job.own_peak_mib(),
                        "tree_rss_mib": rss.peak, "processes": rss.processes,
                        "last_averaging_ok_exists": hasattr(opt, "last_averaging_ok")}})
        return True

    deadline = time.monotonic() + args.time_limit

    def watchdog() -> None:  # opt.step() may block past the deadline (averaging, loading state)
        if not done.wait(max(0.0, deadline - time.monotonic()) + 10.0):
            sys.stderr.write(f"peer {args.index}: still inside opt.step() {args.time_limit + 10:.0f} s after go; stacks:\n")
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
            sys.stderr.flush()
            if report(stuck=True):
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()

    epoch = opt.local_epoch
    epoch_compute, epoch_samples, epoch_losses = 0.0, 0, []
    log.take()
    try:
        while opt.local_epoch < args.epochs and time.monotonic() < deadline:
            xb, yb = batches.next()
            if state["first_step_at"] is None:
                state["first_step_at"] = job.now()
            t0 = time.perf_counter()
            loss = forward_backward(xb, yb)
            spent = time.perf_counter() - t0
            state["compute_s"] += spent
            state["samples"] += len(xb)
            epoch_compute += spent
            epoch_samples += len(xb)
            epoch_losses.append(loss.item())
            opt.step()
            opt.zero_grad()
            if opt.local_epoch != epoch:
                at = job.now()
                averaged, group, source = averaging_outcome(opt, log.take(), log.records > 0)
                state["epochs"].append({"epoch": opt.local_epoch, "at": at, "compute_s": round(epoch_compute, 5),
                                        "samples": epoch_samples, "train_loss": round(sum(epoch_losses) / len(epoch_losses), 5),
                                        "averaged": averaged, "group": group, "source": source,
                                        "fingerprint": fingerprint(model)})
                epoch = opt.local_epoch
                epoch_compute, epoch_samples, epoch_losses = 0.0, 0, []
    except Exception as e:  # reported, not raised: the driver wants the numbers so far
        state["errors"].append(f"{type(e).__name__}: {e}")
        import traceback

        traceback.print_exc()
    done.set()
    report(stuck=False)

    # stay reachable for peers still finishing; the driver says exit (or closes stdin, or kills the group)
    ready = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), ready.set()), daemon=True).start()
    until = time.monotonic() + args.linger
    if args.keep_training and not state["errors"]:
        try:  # like a swarm that goes on: laggards find partners and a next epoch to join (nothing is measured)
            while not ready.is_set() and time.monotonic() < until:
                forward_backward(*batches.next())
                opt.step()
                opt.zero_grad()
        except Exception:
            pass
    ready.wait(max(0.0, until - time.monotonic()))
    threading.Timer(15.0, lambda: os._exit(0)).start()  # a shutdown that hangs must not keep the peer alive
    try:
        opt.shutdown()
        dht.shutdown()
    except Exception:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
