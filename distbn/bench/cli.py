"""`distbn bench`: the benchmark command (registered by `distbn.cli.build_parser`).

    distbn bench [--quick] [--out DIR] [--ranks 1,2,...] [SUITE ...]
    distbn bench report DIR... [--out OUT | --summary]     (an argparse subcommand)
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

from distbn.distribute.launch import current_world_size, finalize_mpi_for_exit

__all__ = ["add_parser", "cmd_bench"]

_USAGE = ("distbn bench [--quick] [--out DIR] [--ranks 1,2,...] [--no-launch] [SUITE ...]\n"
          "       distbn bench report DIR... [--out OUT | --summary]")
_DESCRIPTION = """\
Benchmark jobs. Suites: kernel (BN forward/backward time and effective GB/s vs the
machine's copy bandwidth and PyTorch's CPU batch_norm), allreduce (Allreduce latency and
bandwidth for BN buffers and gradient buckets), sync (synchronized vs replica-local BN
step time and overhead), scaling (training throughput of the quickstart config,
configs/quickstart.yaml, shipped in the package, at each world size), torch
(distbn.torch.SyncBatchNorm vs torch.nn.BatchNorm2d), step (the quickstart model's
training step next to the same model in PyTorch, NCHW and channels_last, one process,
one thread unless --threads, with a per-layer breakdown); keras, only when named (a
Keras 3 training step, synchronized vs replica-local BN, at 2+ ranks, on the backend of
$KERAS_BACKEND). Default: all suites but keras.

Run as one process, it measures each world size of --ranks through mpiexec (one rank
per core, one thread per rank). Under mpiexec/srun with more than one rank, or with
--no-launch, it measures at that job's world size only. Writes DIR/results.json and
DIR/report.md (plus PNG plots when matplotlib is installed; without it, a line says
how to get them).

`distbn bench report DIR... [--out OUT]` merges result directories (e.g. jobs on
different node counts) into one report: written to OUT, or printed."""


class _SuitesOrCommand(argparse._SubParsersAction):
    """Subcommands of `distbn bench` (`report`) beside its positional suite names.

    argparse takes a parser's first positional word as the subcommand; here a word that
    names no subcommand starts the list of suites instead (`distbn bench kernel sync`).
    """

    class _Any(dict):
        def __contains__(self, _name) -> bool:  # argparse's "invalid choice" check
            return True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.choices = self._Any()

    def add_parser(self, name, **kwargs):
        parser = super().add_parser(name, **kwargs)
        self.choices[name] = parser
        return parser

    def __call__(self, parser, namespace, values, option_string=None):
        if values[0] in self._name_parser_map:
            super().__call__(parser, namespace, values, option_string)
            return
        # A suite name. argparse hands this action every word after it, options
        # included (`kernel --quick sync`): parse those with the bench parser again,
        # which calls this action for the next suite name, so the names accumulate.
        namespace.suites = [*namespace.suites, values[0]]
        _, extras = parser.parse_known_args(values[1:], namespace)
        if extras:  # as argparse's own subparsers do: the top level reports them
            vars(namespace).setdefault(argparse._UNRECOGNIZED_ARGS_ATTR, []).extend(extras)


# Options of a suite run that `bench report` refuses (by name) instead of ignoring them.
_RUN_ONLY = (("--quick", {"action": "store_true"}), ("--tiny", {"action": "store_true"}),
             ("--no-launch", {"action": "store_true"}), ("--ranks", {}),
             ("--scaling-config", {}), ("--threads", {}), ("--cold-start", {"type": int}))


def add_parser(sub) -> None:
    """Add the `bench` subcommand (and `bench report`) to the `distbn` subparsers.

    Args:
        sub: the object `ArgumentParser.add_subparsers()` returned.
    """
    p = sub.add_parser("bench", help="benchmark jobs: kernels, allreduce, sync BN, scaling, "
                       "training step vs PyTorch",
                       usage=_USAGE, description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(suites=[], bench_command=None)
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats: a few minutes on a laptop "
                        "(default --ranks 1,2)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default runs/bench-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--ranks", metavar="1,2,...",
                   help="world sizes to measure (default 1,2 with --quick, else powers of two "
                        "up to the CPU count)")
    p.add_argument("--no-launch", action="store_true",
                   help="measure only at this process group's world size, without mpiexec "
                        "(implied under mpiexec/srun with more than one rank; use it for "
                        "`srun -n 1`)")
    p.add_argument("--scaling-config", metavar="YAML",
                   help="training config of the scaling suite (default: the packaged "
                        "configs/quickstart.yaml)")
    p.add_argument("--mpiexec", metavar="PATH",
                   help="the mpiexec to launch with (default: $DISTBN_MPIEXEC, the venv's, PATH)")
    p.add_argument("--threads", metavar="1,2,...",
                   help="kernel and step suites: thread counts to measure at (default: the "
                        "kernel backend's for kernel, one per rank under distbn's launchers; "
                        "1 for step)")
    p.add_argument("--cold-start", type=int, default=0, metavar="N",
                   help="kernel suite: also time N processes compiling the numba kernels at "
                        "once from an empty cache")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds allowed per world size (default: no limit)")
    # Internal: minimal sizes for the tests, and parts that the parent merges itself.
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
    cmds = p.add_subparsers(action=_SuitesOrCommand, dest="bench_command",
                            metavar="SUITE ... | report",
                            help="suites: " + ", ".join(_suite_names())
                                 + " (default: all but keras); "
                                 "or `report DIR...` to merge result directories")
    r = cmds.add_parser("report", help="merge result directories into one report",
                        usage="distbn bench report DIR... [--out OUT | --summary]",
                        description="Merge the results.json of result directories (e.g. "
                                    "jobs on different node counts) into one report: "
                                    "written to OUT, or printed.")
    r.add_argument("dirs", nargs="*", metavar="DIR", help="result directories")
    r.add_argument("--out", metavar="OUT", default=argparse.SUPPRESS,
                   help="where the merged results.json and report.md go (default: print "
                        "the report)")
    r.add_argument("--summary", action="store_true",
                   help="print a compact summary (the README's tables)")
    for flag, kw in _RUN_ONLY:  # accepted only to be refused with a clear message
        r.add_argument(flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
    r.set_defaults(func=_cmd_report)


def _suite_names() -> list[str]:
    from distbn.bench.runner import SUITES

    return list(SUITES)


def _error(message: str) -> int:
    print(f"distbn bench: error: {message}", file=sys.stderr, flush=True)
    return 2


def _command_line(args, suites) -> str:
    argv = ["distbn", "bench"]
    if args.quick:
        argv.append("--quick")
    if args.tiny:
        argv.append("--tiny")
    if args.ranks:
        argv += ["--ranks", args.ranks]
    if args.no_launch:
        argv.append("--no-launch")
    if args.threads:
        argv += ["--threads", args.threads]
    if args.cold_start:
        argv += ["--cold-start", str(args.cold_start)]
    if args.out:
        argv += ["--out", args.out]
    return shlex.join(argv + list(suites))


def _cmd_report(args) -> int:
    from distbn.bench.report import merge_dirs, render_markdown, render_summary, write_report
    from distbn.bench.results import write_results

    dirs = args.dirs
    extra = [f for f in ("quick", "tiny", "no_launch", "ranks", "scaling_config", "threads",
                         "cold_start")
             if getattr(args, f, None)]
    if extra:
        return _error(f"`bench report` takes DIR... and --out only, got --"
                      f"{extra[0].replace('_', '-')}")
    if not dirs:
        return _error("`bench report` needs at least one result directory, got none")
    try:
        merged = merge_dirs(dirs)
    except (FileNotFoundError, ValueError) as exc:
        return _error(str(exc))
    if args.summary:
        if getattr(args, "out", None) is not None:
            return _error("--summary prints to stdout; leave out --out")
        sys.stdout.write(render_summary(merged))
        return 0
    if getattr(args, "out", None) is None:
        sys.stdout.write(render_markdown(merged))
        return 0
    write_results(args.out, merged["environment"], merged["records"])
    paths = write_report(merged, args.out)
    from distbn.bench.runner import note_missing_plots

    note_missing_plots()
    print(f"distbn bench: merged {len(dirs)} result dir(s), {len(merged['records'])} records "
          f"-> {args.out}/results.json, " + ", ".join(str(p) for p in paths), flush=True)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run `distbn bench` (or `distbn bench report`) from parsed arguments.

    Args:
        args: the parsed namespace.

    Returns:
        The exit code: 0 done, 2 usage error, 1 a world size failed.
    """
    from distbn.bench import runner

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    here = args.no_launch or current_world_size() > 1
    problem = None
    try:
        suites = runner.parse_suites(args.suites)
        ranks = runner.parse_ranks(args.ranks) if args.ranks else runner.default_ranks(
            mode != "full")
        args.kernel_threads = runner.parse_ranks(args.threads, "--threads") \
            if args.threads else None
        if args.cold_start < 0:
            raise ValueError(f"--cold-start must be >= 0 processes, got {args.cold_start}")
    except ValueError as exc:
        problem = str(exc)
    if problem is None and "scaling" in suites:
        from distbn.bench.scaling import default_config

        cfg = Path(args.scaling_config) if args.scaling_config else default_config()
        if not cfg.is_file():
            problem = (f"scaling: training config {str(cfg)!r} not found; pass "
                       "--scaling-config YAML or leave out the scaling suite")
    if problem is not None:
        # Every rank of a job finds the same problem: one message, then a clean exit.
        if not here or _world_rank() == 0:
            _error(problem)
        if here:
            finalize_mpi_for_exit()
        return 2
    command = _command_line(args, args.suites)
    if here:
        return _run_here(args, suites, mode, ranks, command)

    start = time.perf_counter()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = args.out or runner.default_out_dir()
    try:
        results, failures = runner.launch_all(suites, ranks, mode, out, args.scaling_config,
                                              mpiexec=args.mpiexec, timeout=args.timeout,
                                              kernel_threads=args.kernel_threads,
                                              cold_start=args.cold_start)
    except FileNotFoundError as exc:  # no mpiexec: say where we looked
        return _error(str(exc))
    except KeyboardInterrupt:  # the running world size's group is stopped already
        print("distbn bench: interrupted", file=sys.stderr, flush=True)
        return 130
    if results is None:
        _error("no world size completed: " + "; ".join(failures))
        return 1
    env = results["environment"]
    env.update(command=command, date=date, elapsed_s=round(time.perf_counter() - start, 1))
    paths = runner.finish(results, out)
    print(f"distbn bench: {len(results['records'])} records in "
          f"{time.perf_counter() - start:.0f} s -> " + ", ".join(str(p) for p in paths),
          flush=True)
    if failures:
        print("distbn bench: error: " + "; ".join(failures), file=sys.stderr, flush=True)
        return 1
    return 0


def _world_rank() -> int:
    """This process's rank in COMM_WORLD (initialises MPI if needed)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def _run_here(args, suites, mode, ranks, command) -> int:
    """Measure at this MPI job's world size; rank 0 writes the results."""
    from mpi4py import MPI

    from distbn.bench import runner

    comm = MPI.COMM_WORLD
    if args.ranks and comm.rank == 0 and ranks != [comm.size]:
        print(f"[bench] note: --ranks {args.ranks} is ignored inside an MPI job; measuring "
              f"at its world size {comm.size}", file=sys.stderr, flush=True)
    # Rank 0 picks the directory (a timestamp could differ between ranks).
    out = comm.bcast(args.out or runner.default_out_dir(), root=0)
    results = runner.measure(suites, mode, comm, args.scaling_config,
                             kernel_threads=args.kernel_threads, cold_start=args.cold_start)
    if comm.rank == 0:
        results["environment"]["command"] = command
        paths = runner.finish(results, out, report=not args.no_report)
        if not args.no_report:  # else it is a part, merged and reported by the launcher
            print(f"distbn bench: {len(results['records'])} records at world size "
                  f"{comm.size} -> " + ", ".join(str(p) for p in paths), flush=True)
    comm.Barrier()
    return 0
