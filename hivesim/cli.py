"""The ``hivesim`` command line: ``run`` a topology, run one real ``peer``, ``monitor`` a live training run, ``plot`` a results folder."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from pathlib import Path
from typing import Any

import hivesim


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hivesim",
        description="Decentralized deep learning over unreliable peers: simulate a swarm on Ray, or run real peers.",
    )
    parser.add_argument("--version", action="version", version=f"hivesim {hivesim.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run a topology (a simulated swarm on Ray) and write a results folder")
    run.add_argument("topology", help="topology YAML file, e.g. topologies/quickstart.yaml")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="override topology keys, e.g. duration=20 groups.eu.count=32 (a group of the topology)")
    run.add_argument("--results-dir", help="where the run's folder goes (default: the topology's results_dir, 'results')")
    run.add_argument("--address", help="an existing Ray cluster ('auto'): link shaping off, peers placed by resources")
    run.add_argument("--quiet", action="store_true", help="no progress display; print only the results folder (stdout)")

    peer = commands.add_parser("peer", help="run one real peer without Ray (e.g. a volunteer joining a live run)")
    peer.add_argument("--config", help="peer YAML: name, roles, host, port, advertise_host, dht options")
    peer.add_argument("--initial-peers", nargs="*", default=[], metavar="ADDR", help="addresses of peers already in the swarm")
    peer.add_argument("--host", help="interface to bind (overrides the config; 0.0.0.0 for all)")
    peer.add_argument("--port", type=int, help="port to bind (overrides the config; 0 = any free port)")
    peer.add_argument("--advertise-host", help="host other peers reach this one at (when binding 0.0.0.0)")
    peer.add_argument("--identity", help="file holding this peer's private key (created if missing): same id across restarts")
    peer.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")

    monitor = commands.add_parser(
        "monitor", help="watch a live training run: one line per epoch, optional checkpoints",
        description="Join a live swarm as a monitor (no GPU, trains nothing): read the run's progress from the DHT "
                    "and print one line per epoch ('epoch 12  peers 8  samples/s 3,210  loss 0.412'); with "
                    "--checkpoint-dir and --checkpoint-every, download the training state every N epochs and save it.")
    monitor.add_argument("--initial-peers", nargs="+", required=True, metavar="ADDR", help="addresses of peers in the swarm (tcp://host:port)")
    monitor.add_argument("--run-id", required=True, help="the training run's run_id")
    monitor.add_argument("--target-batch-size", type=int, default=1, metavar="N", help="the run's target batch size (only for estimates)")
    monitor.add_argument("--checkpoint-dir", metavar="D", help="where checkpoints go (<run_id>-epoch<N>.pt)")
    monitor.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N epochs (needs --checkpoint-dir)")
    monitor.add_argument("--model", metavar="MODULE", help="the run's model module (e.g. experiments.train_digits): checkpoints then hold a state_dict too")
    monitor.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between reads (default 2)")
    monitor.add_argument("--duration", type=float, metavar="S", help="stop after this many seconds (default: until Ctrl-C)")
    monitor.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    monitor.add_argument("--port", type=int, default=0, help="port to bind (default: any free port)")

    plot = commands.add_parser("plot", help="re-make the figures of a results folder")
    plot.add_argument("results", help="a results folder written by 'hivesim run'")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"run": _run, "peer": _peer, "monitor": _monitor, "plot": _plot}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, ConnectionError, TimeoutError, OSError) as e:
        print(f"hivesim {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 2 a topology/cluster problem found before anything started (nothing written),
    1 the run failed after it started, 130 interrupted (Ctrl-C); the last two still write the results folder."""
    from hivesim.sim.runner import RunFailed, RunInterrupted, run

    try:
        run_dir = run(args.topology, args.overrides, results_dir=args.results_dir, address=args.address,
                      progress=not args.quiet)
    except RunInterrupted as e:
        print(f"hivesim run: interrupted; partial results in {e.run_dir}", file=sys.stderr)
        if args.quiet:
            print(e.run_dir, flush=True)
        return 130
    except RunFailed as e:
        print(f"hivesim run: error: the run failed: {e}", file=sys.stderr)
        if args.quiet:
            print(e.run_dir, flush=True)
        return 1
    if args.quiet:
        print(run_dir, flush=True)  # the one line a script needs: where the results are
    return 0


def _peer(args: argparse.Namespace) -> int:
    from hivesim.dht.facade import normalize_initial_peers
    from hivesim.net.identity import Identity
    from hivesim.peer import Peer
    from hivesim.sim.topology import load_peer_config

    # the config's keys, its roles (they import, their parameters fit) and options, before binding anything
    config = load_peer_config(args.config, {k: getattr(args, k) for k in ("host", "port", "advertise_host")})
    initial_peers = normalize_initial_peers(args.initial_peers)
    identity = Identity.load_or_create(args.identity) if args.identity else None

    async def serve() -> None:
        peer = Peer(config.name, config.roles, host=config.host, port=config.port, advertise_host=config.advertise_host,
                    identity=identity, dht=config.dht, endpoint=config.endpoint)
        await peer.start(initial_peers)
        print(f"hivesim peer {peer.name} is up at {peer.address}", flush=True)
        print(f"  others join with: hivesim peer --initial-peers {peer.address}", flush=True)
        await _wait_for_signal(args.duration)
        print(f"hivesim peer {peer.name}: leaving", flush=True)
        await peer.stop()

    asyncio.run(serve())
    return 0


async def _wait_for_signal(duration: float | None) -> int | None:
    """Wait for SIGINT or SIGTERM (returns which) or ``duration`` seconds (returns None)."""
    got: list[int] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        got.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await asyncio.wait_for(stop.wait(), duration)
    except asyncio.TimeoutError:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return got[0] if got else None


_ADDRESS = re.compile(r"tcp://[^\s:/]+:\d{1,5}")


def _monitor(args: argparse.Namespace) -> int:
    """``hivesim monitor``: the monitor role on a live swarm under plain asyncio (as ``hivesim peer`` runs one)."""
    bad = [a for a in args.initial_peers if not _ADDRESS.fullmatch(a) or not 0 < int(a.rsplit(":", 1)[1]) < 65536]
    if bad:
        raise ValueError(f"not a peer address: {', '.join(map(repr, bad))} (expected tcp://host:port)")
    if not args.run_id or "." in args.run_id or args.run_id != args.run_id.strip():
        raise ValueError(f"--run-id must be a name without dots or spaces around it, got {args.run_id!r}")
    if args.target_batch_size <= 0:
        raise ValueError(f"--target-batch-size must be positive, got {args.target_batch_size}")
    if (args.checkpoint_dir is None) != (args.checkpoint_every is None):
        raise ValueError("--checkpoint-dir and --checkpoint-every go together (where, and every how many epochs)")
    if args.checkpoint_every is not None and args.checkpoint_every <= 0:
        raise ValueError(f"--checkpoint-every must be a positive number of epochs, got {args.checkpoint_every}")
    if args.checkpoint_dir is not None and Path(args.checkpoint_dir).exists() and not Path(args.checkpoint_dir).is_dir():
        raise ValueError(f"--checkpoint-dir {args.checkpoint_dir} exists and is not a directory")
    if args.interval <= 0:
        raise ValueError(f"--interval must be positive, got {args.interval}")
    if args.duration is not None and args.duration <= 0:
        raise ValueError(f"--duration must be positive, got {args.duration}")
    if args.model is not None:
        from hivesim.roles.trainer import load_model_module

        if str(Path.cwd()) not in sys.path:  # experiments.* from the repository root, as 'hivesim run' finds them
            sys.path.insert(0, str(Path.cwd()))

        try:
            load_model_module(args.model)
        except ImportError as e:
            raise ValueError(f"--model: cannot import {args.model!r} ({e})") from None

    from hivesim.peer import Peer

    params: dict[str, Any] = {"run_id": args.run_id, "target_batch_size": args.target_batch_size,
                              "interval": args.interval, "checkpoint_dir": args.checkpoint_dir,
                              "checkpoint_every": args.checkpoint_every, "model": args.model}

    async def serve() -> int:
        # client mode: it only reads, and others need not reach it
        peer = Peer("monitor", {"monitor": params}, host=args.host, port=args.port, dht={"client_mode": True})
        await peer.start(args.initial_peers)
        role = peer.roles["monitor"]
        role.on_line = lambda line: print(line, flush=True)
        print(f"hivesim monitor: watching run {args.run_id!r} from {peer.address}", file=sys.stderr, flush=True)
        try:
            sig = await _wait_for_signal(args.duration)
        finally:
            await peer.stop()
        if role.checkpoints:
            print(f"hivesim monitor: {len(role.checkpoints)} checkpoints in {args.checkpoint_dir}", file=sys.stderr, flush=True)
        return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(sig, 0) if sig is not None else 0

    return asyncio.run(serve())


def _plot(args: argparse.Namespace) -> int:
    import importlib
    import json

    run_dir = Path(args.results)
    summary_path = run_dir / "summary.json"
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a hivesim results folder (no config.yaml)")
    import yaml

    module = yaml.safe_load(config_path.read_text())["workload"]["module"].rsplit(".", 1)[-1]
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    analysis = importlib.import_module(f"analysis.{module}")
    for path in analysis.make_figures(run_dir):
        print(path)
    if summary_path.exists():
        print(json.dumps(json.loads(summary_path.read_text()).get("workload", {}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
