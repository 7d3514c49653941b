"""The ``hivesim`` command line: ``run`` a topology, run one real ``peer``, ``plot`` a results folder."""

from __future__ import annotations

import argparse
import asyncio
import logging
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
    run.add_argument("overrides", nargs="*", metavar="key=value", help="override topology keys, e.g. duration=20 groups.nodes.count=32")
    run.add_argument("--results-dir", help="where the run's folder goes (default: the topology's results_dir, 'results')")
    run.add_argument("--address", help="an existing Ray cluster ('auto'): link shaping off, peers placed by resources")
    run.add_argument("--quiet", action="store_true", help="no progress display")

    peer = commands.add_parser("peer", help="run one real peer without Ray (e.g. a volunteer joining a live run)")
    peer.add_argument("--config", help="peer YAML: name, roles, host, port, advertise_host, dht options")
    peer.add_argument("--initial-peers", nargs="*", default=[], metavar="ADDR", help="addresses of peers already in the swarm")
    peer.add_argument("--host", help="interface to bind (overrides the config; 0.0.0.0 for all)")
    peer.add_argument("--port", type=int, help="port to bind (overrides the config; 0 = any free port)")
    peer.add_argument("--advertise-host", help="host other peers reach this one at (when binding 0.0.0.0)")
    peer.add_argument("--identity", help="file holding this peer's private key (created if missing): same id across restarts")
    peer.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")

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
        return {"run": _run, "peer": _peer, "plot": _plot}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, ConnectionError, TimeoutError, OSError) as e:
        print(f"hivesim {args.command}: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from hivesim.sim.runner import run

    run(args.topology, args.overrides, results_dir=args.results_dir, address=args.address, progress=not args.quiet)
    return 0


def _peer(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from hivesim.net.identity import Identity
    from hivesim.peer import Peer

    config: dict[str, Any] = {}
    if args.config:
        loaded = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: a peer config is a mapping (name, roles, host, port, dht)")
        config = loaded
    unknown = set(config) - {"name", "roles", "host", "port", "advertise_host", "dht", "endpoint"}
    if unknown:
        raise ValueError(f"{args.config}: unknown keys {sorted(unknown)}; allowed: name, roles, host, port, advertise_host, dht, endpoint")
    for key in ("host", "port", "advertise_host"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    identity = Identity.load_or_create(args.identity) if args.identity else None

    async def serve() -> None:
        peer = Peer(config.get("name", "volunteer"), config.get("roles"), host=config.get("host", "127.0.0.1"),
                    port=int(config.get("port", 0)), advertise_host=config.get("advertise_host"), identity=identity,
                    dht=config.get("dht"), endpoint=config.get("endpoint"))
        await peer.start(args.initial_peers)
        print(f"hivesim peer {peer.name} is up at {peer.address}", flush=True)
        print(f"  others join with: hivesim peer --initial-peers {peer.address}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), args.duration)
        except asyncio.TimeoutError:
            pass
        print(f"hivesim peer {peer.name}: leaving", flush=True)
        await peer.stop()

    asyncio.run(serve())
    return 0


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
