"""The `distbn` command: `distbn info`, and the subcommands later issues add."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from mpi4py import MPI

    from distbn.info import environment, format_info

    env = environment(MPI.COMM_WORLD)
    if MPI.COMM_WORLD.rank == 0:  # rank 0 owns output; the others only contribute their host/pid
        print(json.dumps(env, indent=2) if args.json else format_info(env), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    import distbn

    parser = argparse.ArgumentParser(
        prog="distbn",
        description="Synchronized batch normalization and data-parallel training over MPI.",
    )
    parser.add_argument("--version", action="version", version=f"distbn {distbn.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", help="versions, BLAS, MPI library and the ranks' hosts")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distbn` console script. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
