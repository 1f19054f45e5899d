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
    typed = os.environ.get(COMMAND_ENV) or shlex.join([_prog(), "train", *_train_argv(args)])
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


def _prog() -> str:
    """How the user ran distbn: the console script's path as typed (e.g. .venv/bin/distbn),
    else `distbn` (for `python -m distbn`)."""
    return sys.argv[0] if os.path.basename(sys.argv[0]) == "distbn" else "distbn"


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
    from distbn.mpiexec import mpiexec_command, rank_env
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
    env = rank_env()
    try:
        if sys.stderr.isatty():
            env.setdefault(TTY_ENV, "1")  # the ranks' progress bar still reaches a terminal
    except (AttributeError, ValueError):
        pass
    typed = [_prog(), "launch", "-n", str(args.n)]
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


def _agreed_problem(world, problem, prog) -> int:
    """Every rank's problem (a message or None) is shared; any ends every rank with exit
    2, printed once by rank 0 (a rank alone in error would leave the others waiting)."""
    problems = [p for p in world.allgather_object(problem, name=f"{prog}.setup") if p]
    if not problems:
        return 0
    if world.replica_id == 0:
        print(f"distbn {prog}: error: {problems[0]}", file=sys.stderr, flush=True)
    return 2


def _run_errors() -> tuple:
    from distbn.train.config import ConfigError
    from distbn.train.data import DataError
    from distbn.train.inference import RunError

    return (RunError, ConfigError, DataError)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from distbn.distribute import get_strategy
    from distbn.train import inference

    world = get_strategy()
    trainer, problem = None, None
    try:
        trainer = inference.prepare_evaluation(args.run_dir, world, data=args.data,
                                               weights=args.weights)
    except _run_errors() as exc:
        problem = str(exc)
    if _agreed_problem(world, problem, "evaluate"):
        return 2
    record = trainer.evaluate(args.split)
    if world.replica_id == 0:
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            loss, acc = record["loss"], record["accuracy"]
            print(f"{args.split}: loss {'n/a' if loss is None else f'{loss:.4f}'} accuracy "
                  f"{'n/a' if acc is None else f'{acc:.4f}'} ({record['samples']} samples, "
                  f"{world.num_replicas_in_sync} rank(s))", flush=True)
    return 0


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    """PreciseBN of a finished run: model.npz's weights with population BN statistics of
    the run's first N training batches, written by rank 0 (`distbn.train.precise_bn`)."""
    import numpy as np

    from distbn.distribute import get_strategy
    from distbn.train import inference
    from distbn.train.progress import make_progress
    from distbn.train.rundir import atomic_write

    world = get_strategy()
    out = args.out or os.path.join(args.run_dir, inference.PRECISE_FILE)
    trainer, problem = None, None
    try:  # everything that can be wrong is found before any collective, on every rank
        if args.batches < 1:
            raise inference.RunError(f"--batches must be >= 1, got --batches {args.batches}")
        inference.load_config_of(args.run_dir)  # a run directory at all, before --out
        if os.path.lexists(out) and not args.overwrite:
            raise inference.RunError(f"{out} exists; pass --overwrite to replace it")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise inference.RunError(f"--out {out}: its directory does not exist")
        trainer = inference.prepare_evaluation(args.run_dir, world)
    except _run_errors() as exc:
        problem = str(exc)
    if _agreed_problem(world, problem, "recalibrate"):
        from distbn.distribute.launch import finalize_mpi_for_exit

        finalize_mpi_for_exit()
        return 2
    progress = make_progress("lines", world.replica_id, args.batches, out=sys.stderr)
    try:
        summary = trainer.precise_bn(args.batches, progress)
    except (ValueError, RuntimeError) as exc:  # raised on every rank together
        if world.replica_id == 0:
            print(f"distbn recalibrate: error: {exc}; nothing written", file=sys.stderr,
                  flush=True)
        from distbn.distribute.launch import finalize_mpi_for_exit

        finalize_mpi_for_exit()
        return 1
    if world.replica_id == 0:
        weights = trainer.model.get_weight_dict()
        atomic_write(out, lambda fh: np.savez(fh, **weights))
        for name, s in summary.items():
            print(f"{name}: {s['count']} positions per channel, max |change| moving_mean "
                  f"{s['mean_change']:.4g} moving_variance {s['var_change']:.4g}", flush=True)
        print(f"wrote {out} ({len(summary)} BN layer(s) recomputed over {args.batches} "
              f"batches, {world.num_replicas_in_sync} rank(s))", flush=True)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from distbn.distribute import get_strategy
    from distbn.train import inference
    from distbn.train.rundir import atomic_write

    world = get_strategy()
    model, x, problem = None, None, None
    try:
        if os.path.lexists(args.out) and not args.overwrite:
            raise inference.RunError(f"{args.out} exists; pass --overwrite to replace it")
        model = inference.load_model(args.run_dir)
        config = inference.load_config_of(args.run_dir)
        x = inference.prepare_inputs(config, inference.read_inputs(args.input, args.key))
    except _run_errors() as exc:
        problem = str(exc)
    if _agreed_problem(world, problem, "predict"):
        return 2
    out = inference.predict_sharded(model, x, world, batch_size=args.batch_size)
    if world.replica_id == 0:
        atomic_write(args.out, lambda fh: np.savez(fh, predictions=out))
        print(f"wrote {args.out}: predictions {out.shape} {out.dtype}", flush=True)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from distbn.train import inference
    from distbn.train.export import ExportError, export_keras

    try:
        if os.path.lexists(args.keras) and not args.overwrite:
            raise inference.RunError(f"{args.keras} exists; pass --overwrite to replace it")
        model = inference.load_model(args.run_dir)
        config = inference.load_config_of(args.run_dir)
        diff = export_keras(model, inference.sample_shape(config), args.keras)
    except (*_run_errors(), ExportError) as exc:
        print(f"distbn export: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {args.keras} (Keras {diff['keras']}, {diff['backend']} backend); its "
          f"predictions differ from distbn's by at most {diff['max_abs_diff']:.3g} on "
          f"{diff['samples']} random inputs", flush=True)
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

    p = sub.add_parser(
        "evaluate", help="loss and accuracy of a finished run's model (one process or under "
                         "mpiexec / distbn launch)",
        description="Rebuild a run's model from RUN_DIR/config.yaml and model.npz and "
                    "evaluate it on its test split (or --split train, or another --data "
                    "file), sharded over the ranks. Writes nothing.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of distbn train")
    p.add_argument("--data", metavar="FILE.npz",
                   help="x_train, y_train, x_test, y_test to use instead of the run's data")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--weights", metavar="FILE.npz",
                   help="weights to evaluate instead of RUN_DIR/model.npz (e.g. the "
                        "model.precise.npz of distbn recalibrate)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "recalibrate", help="PreciseBN: recompute a finished run's BN statistics over N "
                            "training batches (one process or under mpiexec)",
        description="Load RUN_DIR's model, recompute every BatchNormalization layer's "
                    "moving statistics as the population statistics of the run's first N "
                    "training batches (weights frozen, layers in order, pooled exactly "
                    "over the ranks; the same result at any rank count) and write the "
                    "weights to RUN_DIR/model.precise.npz (or --out), atomically. Exit 0 "
                    "written; 2 bad input, 1 failure: nothing written.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of distbn train")
    p.add_argument("--batches", type=int, required=True, metavar="N",
                   help="how many global training batches (train.global_batch_size each)")
    p.add_argument("--out", metavar="FILE.npz",
                   help="where to write (default RUN_DIR/model.precise.npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_recalibrate)

    p = sub.add_parser(
        "predict", help="a finished run's model's outputs for the inputs of an .npz",
        description="Run a run's model in inference mode on INPUT.npz's array (channels-"
                    "last samples, like the training data) and write OUT.npz with "
                    "`predictions` (the model's outputs: logits or probabilities, as it "
                    "was trained). Sharded over the ranks under mpiexec.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("input", metavar="INPUT.npz")
    p.add_argument("--out", required=True, metavar="OUT.npz")
    p.add_argument("--key", default="x", help="the input array's name (default x)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.npz")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "export", help="write a finished run's model as a Keras 3 .keras file",
        description="Build the same model in Keras 3 (the keras extra), copy the trained "
                    "weights, check that it predicts what distbn predicts, and save it.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--keras", required=True, metavar="OUT.keras")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_export)

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
