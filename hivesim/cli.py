"""The ``hivesim`` command line."""

from __future__ import annotations

import argparse
import sys

import hivesim


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hivesim",
        description="Decentralized deep learning over unreliable peers: simulate a swarm on Ray, or run real peers.",
    )
    parser.add_argument("--version", action="version", version=f"hivesim {hivesim.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
