"""`distbn train`: the collective decisions around the Trainer.

Every rank loads the config and builds the model; the outcomes are allgathered, so a
problem ends every rank together with the same exit code, printed once by rank 0.
Everything that can refuse (config, run directory, model, a checkpoint that does not
fit, a directory that holds another run) is decided before any file is written, so
exit 2 means the file system is as it was.
"""

from __future__ import annotations

import shlex
import sys
import traceback

from distbn.distribute import get_strategy
from distbn.train import checkpoint as ckpt
from distbn.train.config import ConfigError, config_hash, load_config
from distbn.train.data import DataError
from distbn.train.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionFlag
from distbn.train.rundir import (
    RunDirError,
    check_run_dir,
    clear_previous_run,
    default_run_dir,
    previous_run,
)
from distbn.train.trainer import Trainer, TrainingError

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_PREEMPTED", "run"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # usage or config error: nothing was trained or written
EXIT_PREEMPTED = PREEMPTED_EXIT_CODE  # a signal asked to stop; a checkpoint was written


def _agree(world, problem, name) -> list:
    """Allgather this rank's `(code, message)` problem (None if fine); the list of all."""
    return world.allgather_object(problem, name=name)


def _report(world, problems, err) -> int:
    """Print the problems once (rank 0) and return the exit code every rank uses."""
    failing = [(r, p) for r, p in enumerate(problems) if p is not None]
    if not failing:
        return EXIT_OK
    code = EXIT_USAGE if all(p[0] == EXIT_USAGE for _, p in failing) else EXIT_FAILURE
    if world.replica_id == 0:
        messages = [p[1] for _, p in failing]
        if len(failing) == len(problems) and len(set(messages)) == 1:
            text = messages[0]  # the usual case: every rank hit the same problem
        else:
            text = "\n".join(f"[rank {r}] {p[1]}" for r, p in failing)
        print(f"distbn train: error: {text}", file=err or sys.stderr, flush=True)
    return code


def _check_hashes(digests) -> tuple | None:
    if len(set(digests)) == 1:
        return None
    groups: dict = {}
    for r, d in enumerate(digests):
        groups.setdefault(d, []).append(r)
    parts = [f"rank(s) {', '.join(map(str, ranks))}: sha256 {d[:12]}"
             for d, ranks in groups.items()]
    return (EXIT_USAGE, "the ranks hold different resolved configs (" + "; ".join(parts)
            + "); every rank must read the same file with the same --set options")


def _check_sync_group(config, size, blame) -> tuple | None:
    k = config.strategy.sync_group
    if isinstance(k, int) and size % k:
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        return (EXIT_USAGE, f"{blame('strategy.sync_group')}: strategy.sync_group: must "
                            f"divide the number of ranks ({size}), got {k} (valid: "
                            f"{divisors}, null or 'node')")
    return None


def _blame(config_path, overrides):
    """Where a key's value came from: the `--set` that gave it, else the config file."""
    def where(key: str) -> str:
        for item in reversed(list(overrides)):
            if item.partition("=")[0].strip() == key:
                return f"--set {item}"
        return str(config_path)
    return where


def _training_strategy(world, config):
    """The strategy BN layers synchronize over: the world's, or one with the sync group."""
    k = config.strategy.sync_group
    if world.num_replicas_in_sync == 1 or k is None:
        return world
    from distbn.distribute import MPIStrategy

    return MPIStrategy(comm=world.comm, sync_group=k,
                       stall_timeout=config.strategy.stall_timeout)


def _check_kernels(announce) -> tuple | None:
    """The kernel backend (DISTBN_KERNELS) loads: checked before anything is written.
    With `announce`, say when the first steps will compile the kernels."""
    from distbn import ops

    try:
        kern = ops.kernels()
    except (ImportError, ValueError, RuntimeError) as exc:  # a typo; numba that won't load
        return (EXIT_USAGE, str(exc))
    if announce and ops.backend_name() == "numba" and not kern.cache_is_warm():
        print("compiling the BN kernels (numba; first run after install only, about 12 s)",
              file=sys.stderr, flush=True)
    return None


def resume_command(command, path) -> str:
    """The command that resumes a stopped run: `command` with `--run-dir path` (added or
    replaced) and without `--overwrite`, which would delete the checkpoint."""
    argv = shlex.split(command) if command else ["distbn", "train"]
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--run-dir":
            skip = True
            continue
        if arg.startswith("--run-dir=") or arg == "--overwrite":
            continue
        out.append(arg)
    return shlex.join([*out, "--run-dir", str(path)])


def _take_over(trainer, path, found, overwrite, warn) -> tuple | None:
    """Rank 0: decide whether this run may use the directory (writes nothing).

    A directory holds another run when its config.yaml gives another seed, data or
    model, when its newest checkpoint does not fit this model, or when it has run files
    but no checkpoint and a config.yaml that differs (or none): then the answer is a
    usage error that says what is there, unless `overwrite`. Otherwise a checkpoint is
    resumed (changed training settings are listed in a warning).
    """
    prev = previous_run(path, trainer.config)
    if prev is None or overwrite:
        return None
    misfit = trainer.checkpoint_problem(found) if found is not None else None
    reasons = []
    if prev.identity_changes:
        reasons.append("its config.yaml has another " + prev.describe(prev.identity_changes))
    if misfit:
        reasons.append(misfit)
    if found is None and prev.changes and not reasons:
        reasons.append("it has no checkpoint to resume and its config.yaml differs in "
                       + prev.describe(prev.changes))
    if found is None and prev.unknown:
        reasons.append("it has no config.yaml of distbn's")
    if reasons:
        return (EXIT_USAGE, f"run directory {str(path)!r} holds another run ({prev.contents()}): "
                            + "; ".join(reasons) + ". Nothing was changed. Pass --overwrite "
                            "to replace that run, or choose another --run-dir.")
    if found is not None and prev.changes:
        warn(f"resuming {path} with changed settings: {prev.describe(prev.changes)}")
    return None


def run(config_path, overrides=(), run_dir=None, verbose=False, strategy=None, out=None,
        err=None, overwrite=False, command=None) -> int:
    """`distbn train`: load, check, build and train, with collective decisions.

    Failures during training that are not collective raise, and under MPI the abort
    hook (installed by MPIStrategy) ends the whole job.

    Args:
        config_path: the YAML config.
        overrides: "KEY.PATH=VALUE" strings (`--set`).
        run_dir: the run directory; default `runs/<config stem>-<timestamp>`, chosen by
            rank 0 and shared.
        verbose: other ranks print progress lines; rank 0 prints the model summary.
        strategy: the world strategy (default `get_strategy()`).
        out, err: streams for progress/summary and for errors (default stdout/stderr).
        overwrite: replace a previous run in `run_dir` (its config.yaml, metrics.jsonl,
            model.npz and checkpoints) instead of refusing to.
        command: the command line the user ran (for the resume hint after a stop).

    Returns:
        0 done, 2 usage or config error (nothing trained or written), 1 failure,
        75 stopped by a signal after writing a checkpoint.
    """
    world = strategy if strategy is not None else get_strategy()
    rank, size = world.replica_id, world.num_replicas_in_sync
    overrides = list(overrides)
    err = err or sys.stderr

    def warn(msg):
        print(f"[rank 0] warning: {msg}", file=err, flush=True)

    # 1. The config, the kernels and, on rank 0, the run directory: checked before
    #    anything is written.
    config, problem, path = None, None, None
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        problem = (EXIT_USAGE, str(exc))
    problem = problem or _check_kernels(announce=rank == 0)
    if problem is None and rank == 0:
        try:
            path = check_run_dir(run_dir if run_dir is not None
                                 else default_run_dir(config_path))
        except RunDirError as exc:
            problem = (EXIT_USAGE, str(exc))
    digest = None if config is None else config_hash(config)
    gathered = world.allgather_object((problem, digest, path), name="train.config")
    code = _report(world, [g[0] for g in gathered], err)
    if code:
        return code
    problem = (_check_hashes([g[1] for g in gathered])
               or _check_sync_group(config, size, _blame(config_path, overrides)))
    if _report(world, [problem] * size, err):  # identical on every rank: no message
        return EXIT_USAGE
    path = gathered[0][2]
    if config.strategy.stall_timeout is not None:  # same config everywhere: collective
        world.set_stall_timeout(config.strategy.stall_timeout)

    # 2. Data, model and optimizer, on every rank.
    trainer, problem = None, None
    try:
        train_strategy = _training_strategy(world, config)
        trainer = Trainer(config, train_strategy, run_dir=path, verbose=verbose, out=out)
    except (ConfigError, DataError) as exc:
        problem = (EXIT_USAGE, str(exc))
    except Exception as exc:  # a bug or an environment problem: keep the traceback
        problem = (EXIT_FAILURE, "".join(traceback.format_exception(exc)).rstrip())
    code = _report(world, _agree(world, problem, "train.setup"), err)
    if code:
        return code

    # 3. Rank 0 looks for a checkpoint, decides whether the directory is this run's
    #    (nothing written yet), then creates it; the others learn the outcome.
    problem, found = None, None
    if rank == 0:  # elsewhere open_run_dir writes nothing; it only marks the trainer ready
        try:
            found = None if overwrite else ckpt.latest_checkpoint(path, warn=warn)
            problem = _take_over(trainer, path, found, overwrite, warn)
            if problem is None:
                removed = clear_previous_run(path) if overwrite else []
                removed += trainer.open_run_dir(resume_step=None if found is None
                                                else int(found[1]["step"]))
                if removed:
                    print(f"[rank 0] note: replaced {', '.join(removed)} of a previous run "
                          f"in {path}", file=err, flush=True)
        except OSError as exc:
            problem = (EXIT_FAILURE, f"cannot write the run directory {path!r}: {exc}")
    problem = world.broadcast_object(problem, root=0, name="train.run_dir")
    code = _report(world, [problem] + [None] * (size - 1), err)
    if code:
        return code

    # 4. Resume (rank 0 decides what to load and shares it), then train. A TrainingError
    #    or a preemption is raised on every rank at the same step.
    if rank != 0:
        trainer.open_run_dir()
    try:
        trainer.restore(found)
    except ValueError as exc:
        if trainer.run_dir is not None:
            trainer.run_dir.close()
        return _report(world, [(EXIT_USAGE, str(exc))] * size, err)
    with PreemptionFlag() as flag:
        trainer.preemption = flag
        try:
            trainer.fit()
        except TrainingError as exc:
            if trainer.run_dir is not None:
                trainer.run_dir.close()
            return _report(world, [(EXIT_FAILURE, str(exc))] * size, err)
        except Preempted as stop:
            if trainer.run_dir is not None:
                trainer.run_dir.close()
            if rank == 0:
                print(f"[rank 0] {stop}: checkpoint {stop.path or '(no run directory)'}; "
                      f"exiting with {EXIT_PREEMPTED}. To resume, run:\n"
                      f"  {resume_command(command, path)}", file=err, flush=True)
            return EXIT_PREEMPTED
    return EXIT_OK
