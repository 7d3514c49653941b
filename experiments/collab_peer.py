"""One peer of the collaborative-training study outside the simulator, on hivemind's Optimizer or hivesim's.

    python experiments/collab_peer.py --lib hivemind|hivesim --index I --peers N [--initial-peers ADDR ...]
        --batch 16 --target-batch-size 512 --max-samples 3200 --eval-every-samples 320 [--lr 0.003 --time-limit 240]

The same code drives both libraries (hivesim's ``Optimizer`` has hivemind's API; only the import differs), like
``benchmarks/optimizer_peer.py``, whose averaging-status reader it reuses. The job is ``experiments/char_lm.py``
(shard ``index`` of ``peers``), AdamW, gradient averaging with float16 compression: the study's
``gradient_averaging`` method. The peer speaks JSON lines on stdout: ``{"address": [...]}`` (peer 0),
``{"ready": i}`` after one warm-up step (a peer that never stepped is invisible to hivemind's progress
trackers), then, after reading ``go``, ``{"sample": {...}}`` lines in the simulator's ``samples.jsonl`` schema:
``eval`` (held-out loss) and ``epoch`` at every epoch change, ``trainer_done`` at the end, each with the running
totals ``samples_total``, ``compute_s``, ``wall_s`` and ``bytes_sent_total``. Bytes: hivemind's traffic goes
through its p2p daemons, so no per-peer counter exists; ``bytes_sent_total`` is the loopback interface's
transmitted bytes since go divided by the number of peers (every peer of the job runs on this machine's
loopback, nothing else should be running). Then it idles until ``exit`` (others may still average or load
the state from it).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from functools import partial

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

from optimizer_peer import AveragingLog, averaging_outcome, say  # noqa: E402


def loopback_tx() -> int:
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", choices=["hivemind", "hivesim"], required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--run-id", default="collab_study")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--target-batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-samples", type=int, default=3200)
    parser.add_argument("--eval-every-samples", type=int, default=320)
    parser.add_argument("--matchmaking-time", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--time-limit", type=float, default=240.0)
    args = parser.parse_args()

    import torch

    from experiments import char_lm

    torch.set_num_threads(1)
    log = AveragingLog()
    log.install([f"{args.lib}.optim"])
    if args.lib == "hivemind":
        from hivemind import DHT, Optimizer

        dht = DHT(initial_peers=args.initial_peers, start=True)
        addresses = [str(a) for a in dht.get_visible_maddrs()]
        from hivemind.compression import Float16Compression

        codec = {"grad_compression": Float16Compression(), "state_averaging_compression": Float16Compression()}
    else:
        from hivesim import DHT, Optimizer

        dht = DHT(initial_peers=args.initial_peers, start=True)
        addresses = [str(a) for a in dht.get_visible_addresses()]
        codec = {"grad_compression": "float16", "state_averaging_compression": "float16"}
    if args.index == 0:
        say({"address": addresses})
    name = f"{args.lib}.{args.index}"
    model = char_lm.make_model(0)
    data = char_lm.batches(args.index, args.batch, seed=args.index, num_shards=args.peers)
    opt = Optimizer(dht=dht, run_id=args.run_id, target_batch_size=args.target_batch_size,
                    batch_size_per_step=args.batch, optimizer=partial(torch.optim.AdamW, lr=args.lr),
                    params=model.parameters(), matchmaking_time=args.matchmaking_time,
                    averaging_timeout=args.timeout, verbose=False, **codec)
    # one warm-up step makes the peer visible to the others' progress trackers; its gradient is dropped
    char_lm.loss(model, next(data)).backward()
    model.zero_grad()
    opt.step()
    opt.zero_grad()
    say({"ready": args.index})
    if sys.stdin.readline().strip() != "go":
        return
    tx0, started = loopback_tx(), time.monotonic()
    totals = {"samples_total": 0, "compute_s": 0.0}

    def sample(kind: str, value: float, **fields) -> None:
        say({"sample": {"t": time.time(), "peer": name, "name": kind, "value": value, **fields, **totals,
                        "compute_s": round(totals["compute_s"], 4), "wall_s": round(time.monotonic() - started, 4),
                        "bytes_sent_total": (loopback_tx() - tx0) // args.peers, "method": "gradient_averaging",
                        "lib": args.lib}})

    def evaluate() -> None:
        result = char_lm.evaluate(model)
        sample("eval", result["loss"], accuracy=result["accuracy"], epoch=opt.local_epoch)

    evaluate()
    last_eval, epoch, reason = 0, opt.local_epoch, "max_samples"
    log.take()
    try:
        while totals["samples_total"] < args.max_samples:
            if time.monotonic() - started > args.time_limit:
                reason = "time_limit"
                break
            t0 = time.perf_counter()
            char_lm.loss(model, next(data)).backward()
            totals["compute_s"] += time.perf_counter() - t0
            totals["samples_total"] += args.batch
            opt.step()
            opt.zero_grad()
            if opt.local_epoch != epoch:
                averaged, group, _ = averaging_outcome(opt, log.take(), log.records > 0)
                sample("epoch", opt.local_epoch, previous=epoch, averaged=bool(averaged), group_size=group or 0,
                       downloaded=opt.local_epoch > epoch + 1)
                epoch = opt.local_epoch
                if totals["samples_total"] - last_eval >= args.eval_every_samples:
                    last_eval = totals["samples_total"]
                    evaluate()
    except Exception as e:  # reported: the driver wants the numbers so far
        reason = f"error: {type(e).__name__}: {e}"
    if last_eval != totals["samples_total"]:
        evaluate()
    sample("trainer_done", opt.local_epoch, reason=reason)
    exit_read = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), exit_read.set()), daemon=True).start()
    exit_read.wait(600)
    threading.Timer(10.0, lambda: os._exit(0)).start()
    try:
        opt.shutdown()
        dht.shutdown()
    except Exception:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
