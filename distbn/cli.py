"""The `distbn` command: `distbn info`, `distbn train`, `distbn launch`."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

__all__ = ["main"]

# Commands that run many steps over large arrays: they keep freed memory for reuse
# (distbn/memory.py; DISTBN_MALLOC=default turns this off).
_LONG_RUNNING = ("train", "bench", "compare")
# `distbn launch` tells the ranks the command the user typed (for the resume hint).
COMMAND_ENV = "DISTBN_COMMAND"


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from distbn.info import environment, format_info

    env = environment()
    if env["ranks"][0]["pid"] == os.getpid() or env["mpi_standard"] is None:
        # rank 0 owns output; the others only contribute their host/pid
        print(json.dumps(env, indent=2) if args.json else format_info(env), flush=True)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from distbn.distribute import get_strategy
    from distbn.train import command

    world = get_strategy()
    # The user's command line, for the resume hint: `distbn launch` passes its own.
    typed = os.environ.get(COMMAND_ENV) or shlex.join(["distbn", "train", *_train_argv(args)])
    try:
        code = command.run(args.config, overrides=args.set or (), run_dir=args.run_dir,
                           verbose=args.verbose, strategy=world, overwrite=args.overwrite,
                           command=typed)
    except KeyboardInterrupt:
        if world.num_replicas_in_sync > 1:
            raise  # the abort hook ends every rank
        print("distbn train: interrupted", file=sys.stderr, flush=True)
        return 130
    if code:
        from distbn.distribute.launch import finalize_mpi_for_exit

        finalize_mpi_for_exit()
    return code


def _train_argv(args: argparse.Namespace) -> list[str]:
    """The `distbn train` arguments that `launch` passes on."""
    argv = [args.config]
    for item in args.set or ():
        argv += ["--set", item]
    if args.run_dir is not None:
        argv += ["--run-dir", args.run_dir]
    if args.verbose:
        argv.append("--verbose")
    if args.overwrite:
        argv.append("--overwrite")
    return argv


def _cmd_launch(args: argparse.Namespace) -> int:
    import socket

    from distbn.launcher import run_group
    from distbn.mpiexec import mpiexec_command, one_thread_env
    from distbn.train.preemption import LAUNCHER_ENV
    from distbn.train.progress import TTY_ENV

    if args.n < 1:
        print(f"distbn launch: error: -n must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    if args.hostfile is not None and not os.path.isfile(args.hostfile):
        print(f"distbn launch: error: hostfile {args.hostfile!r} does not exist",
              file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.hostfile is None and cores and args.n > cores:
        print(f"distbn launch: warning: {args.n} ranks on {cores} core(s) of this machine: "
              "the ranks take turns on the cores and every collective waits for the slowest "
              "(expect a slowdown well beyond the ratio); use -n <= cores or a --hostfile",
              file=sys.stderr, flush=True)
    argv = [sys.executable, "-m", "mpi4py", "-m", "distbn", "train", *_train_argv(args)]
    try:
        cmd = mpiexec_command(args.n, argv, mpiexec=args.mpiexec, hostfile=args.hostfile)
    except FileNotFoundError as exc:
        print(f"distbn launch: error: {exc}", file=sys.stderr)
        return 2 if args.mpiexec else 1
    env = one_thread_env()
    try:
        if sys.stderr.isatty():
            env.setdefault(TTY_ENV, "1")  # the ranks' progress bar still reaches a terminal
    except (AttributeError, ValueError):
        pass
    typed = ["distbn", "launch", "-n", str(args.n)]
    for flag, value in (("--hostfile", args.hostfile), ("--mpiexec", args.mpiexec)):
        typed += [flag, value] if value is not None else []
    env[COMMAND_ENV] = shlex.join([*typed, *_train_argv(args)])
    # The ranks stop (with a checkpoint) when this launcher dies, instead of hanging.
    env[LAUNCHER_ENV] = f"{socket.gethostname()}:{os.getpid()}"
    print(f"distbn launch: {shlex.join(cmd)}", flush=True)
    # mpiexec and the ranks in their own process group; SIGTERM/SIGUSR1 sent to this
    # launcher reach the ranks as SIGUSR1 (they checkpoint and exit 75: Hydra would end
    # them at once on SIGTERM), Ctrl-C as SIGINT, a second Ctrl-C stops the group.
    return run_group(cmd, env=env, forward_signals=True).exit_code


def _cmd_plot(args: argparse.Namespace) -> int:
    from distbn.plot import PlotError, plot_run

    notes = []
    try:
        out = plot_run(args.run_dir, args.out, notes=notes)
    except PlotError as exc:
        print(f"distbn plot: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for note in notes:
            print(f"distbn plot: note: {note}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG",
                   help="the YAML config (e.g. configs/quickstart.yaml)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable; "
                        "VALUE is read as YAML)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="where config.yaml, metrics.jsonl and model.npz go "
                        "(default runs/<config stem>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--verbose", action="store_true",
                   help="every rank prints its progress lines; rank 0 prints the model summary")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in --run-dir (its config.yaml, metrics.jsonl, "
                        "model.npz and checkpoints); without it, a directory that holds "
                        "another run is refused")


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

    p = sub.add_parser(
        "train", help="train a YAML-configured model (one process, or under mpiexec/srun)",
        description="Train the model a YAML config describes. Run it as one process, or "
                    "under mpiexec/srun (python -m mpi4py -m distbn train ...) for data "
                    "parallelism; exit status 0 done, 2 usage or config error, 1 failure.")
    _add_train_options(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "launch", help="run `distbn train` on N local ranks through mpiexec",
        description="Run `mpiexec -n N python -m mpi4py -m distbn train CONFIG ...` with one "
                    "BLAS/OpenMP thread per rank (unless set), print the command, and exit "
                    "with its status.")
    p.add_argument("-n", type=int, required=True, metavar="N", help="number of ranks")
    p.add_argument("--hostfile", metavar="FILE", help="hosts for mpiexec (-f / --hostfile)")
    p.add_argument("--mpiexec", metavar="PATH",
                   help="the mpiexec to use (default: $DISTBN_MPIEXEC, the venv's, PATH)")
    _add_train_options(p)
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser("plot", help="loss and accuracy curves of a run as a PNG "
                                    "(needs matplotlib: pip install matplotlib)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with metrics.jsonl")
    p.add_argument("--out", metavar="PNG", help="where to write (default RUN_DIR/metrics.png)")
    p.set_defaults(func=_cmd_plot)

    from distbn.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    from distbn.bench.study import add_parser as add_compare_parser  # `distbn compare`

    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distbn` console script. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in _LONG_RUNNING:
        from distbn.memory import retain_freed_memory

        try:
            retain_freed_memory()
        except ValueError as err:  # every rank sees the same environment: all exit here
            print(f"distbn {args.command}: error: {err}", file=sys.stderr, flush=True)
            return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
