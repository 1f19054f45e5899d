"""Running benchmark suites: here (at this MPI job's world size) or over several world sizes.

`measure` runs suites in the current process group: every rank calls it, rank 0 gets
the records. `launch_all` is what a plain `distbn bench` does: for each world size N it
starts `mpiexec -n N python -m mpi4py -m distbn bench --no-launch --out DIR/parts/nN`
(one BLAS/OpenMP thread per rank, as training runs), one size after the other so the
runs never compete for cores, then merges the parts into DIR/results.json.
"""

from __future__ import annotations

import datetime
import difflib
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from distbn.bench import allreduce, frameworks, keras_step, kernel, scaling, step, sync
from distbn.bench.context import Context
from distbn.bench.environment import environment, load_average
from distbn.bench.results import merge_results, read_results, write_results

__all__ = ["SUITES", "OPT_IN", "ONE_PROCESS", "parse_suites", "parse_ranks", "default_ranks",
           "default_out_dir",
           "measure", "launch_all", "finish", "note_missing_plots"]

#: Suite name -> module with `run(ctx)`, in the order they run.
SUITES = {m.NAME: m for m in (kernel, allreduce, sync, scaling, frameworks, step,
                               keras_step)}
#: Suites run only when named: `distbn bench` with no names runs the others.
OPT_IN = ("keras",)
#: Suites measured by one process (rank 0 of the first world size's job), whatever the
#: world size: they time one-process work.
ONE_PROCESS = ("kernel", "step")


def parse_suites(names) -> list[str]:
    """Validate suite names (default: all but the `OPT_IN` ones), in the canonical order.

    Args:
        names: iterable of suite names; empty for the default ones.

    Returns:
        The suite names, without duplicates, in `SUITES` order.

    Raises:
        ValueError: quoting an unknown name, with the closest known one.
    """
    names = list(names or [])
    for name in names:
        if name not in SUITES:
            close = difflib.get_close_matches(name, list(SUITES), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown suite {name!r}{hint}; suites: {', '.join(SUITES)}")
    if not names:
        return [s for s in SUITES if s not in OPT_IN]
    return [s for s in SUITES if s in names]


def parse_ranks(text: str, option: str = "--ranks") -> list[int]:
    """Parse `--ranks`, e.g. "1,2,4", into sorted unique world sizes (or `--threads`).

    Args:
        text: comma-separated positive integers.
        option: the option named in the error.

    Returns:
        The sorted list.

    Raises:
        ValueError: quoting the bad text.
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        ranks = [int(p) for p in parts]
    except ValueError:
        ranks = []
    if not ranks or any(r < 1 for r in ranks):
        raise ValueError(f"{option} must be comma-separated positive integers like 1,2,4, "
                         f"got {text!r}")
    return sorted(set(ranks))


def default_ranks(quick: bool) -> list[int]:
    """World sizes to measure by default: 1,2 with --quick, else powers of two up to
    the CPU count (at least 1,2)."""
    if quick:
        return [1, 2]
    cpus = os.cpu_count() or 1
    out, n = [], 1
    while n <= max(cpus, 2):
        out.append(n)
        n *= 2
    return out


def default_out_dir() -> str:
    """runs/bench-<YYYYmmdd-HHMMSS>, like `distbn train`'s run directories."""
    return os.path.join("runs", "bench-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def measure(suites, mode: str, comm=None, scaling_config=None, stream=None,
            kernel_threads=None, cold_start: int = 0):
    """Run `suites` at `comm`'s world size (collective); rank 0 gets the results.

    The kernel and step suites are one-process work: rank 0 runs them (records at world
    size 1) while the other ranks wait.

    Args:
        suites: validated suite names.
        mode: "full", "quick" or "tiny".
        comm: an mpi4py Intracomm (default COMM_WORLD).
        scaling_config: the training config of the scaling suite (default quickstart).
        stream: where progress goes (default stderr).
        kernel_threads: thread counts of the kernel suite (default: the backend's) and
            of the step suite (default: one).
        cold_start: the kernel suite's cold-start processes (0: none).

    Returns:
        {"environment", "records"} on rank 0, None elsewhere.
    """
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    start = time.perf_counter()
    env = environment(comm)
    ctx = Context(mode, comm, stream, start)
    records = []
    for name in suites:
        ctx.progress(f"suite {name}")
        if name in ONE_PROCESS:
            if ctx.is_root:
                here = Context(mode, None, stream, start)
                records += (kernel.run(here, kernel_threads, cold_start) if name == "kernel"
                            else step.run(here, kernel_threads))
            ctx.barrier()
        elif name == "scaling":
            records += scaling.run(ctx, scaling_config)
        else:
            records += SUITES[name].run(ctx)
    env["elapsed_s"] = round(time.perf_counter() - start, 2)
    env["load_average_end"] = load_average()
    env["mode"] = mode
    env["suites"] = list(suites)
    if not ctx.is_root:
        return None
    records += scaling.derive_efficiency(records)
    return {"environment": env, "records": records}


def _worker_argv(suites, mode, out, scaling_config, kernel_threads=None,
                 cold_start=0) -> list[str]:
    argv = [sys.executable, "-m", "mpi4py", "-m", "distbn", "bench", "--no-launch",
            "--no-report", "--out", str(out)]
    if mode == "quick":
        argv.append("--quick")
    elif mode == "tiny":
        argv.append("--tiny")
    if scaling_config is not None:
        argv += ["--scaling-config", str(scaling_config)]
    if kernel_threads:
        argv += ["--threads", ",".join(str(t) for t in kernel_threads)]
    if cold_start:
        argv += ["--cold-start", str(int(cold_start))]
    return argv + list(suites)


def _run_group(cmd, env, timeout):
    """Run one world size's job under the launcher's policy (`distbn.launcher`). Returns
    the exit code, or None after a timeout; Ctrl-C stops the group and is re-raised."""
    from distbn.launcher import run_group

    res = run_group(cmd, env=env, timeout=timeout)
    if res.interrupted:
        raise KeyboardInterrupt
    return None if res.timed_out else res.exit_code


def launch_all(suites, ranks, mode: str, out_dir, scaling_config=None, mpiexec=None,
               timeout=None, log=None, kernel_threads=None,
               cold_start: int = 0) -> tuple[dict | None, list[str]]:
    """Measure at each world size in `ranks` through mpiexec and merge the results.

    The kernel and step suites run once, in the first (smallest) world size's job.

    Args:
        suites: validated suite names.
        ranks: world sizes, ascending.
        mode: "full", "quick" or "tiny".
        out_dir: the output directory; each world size writes out_dir/parts/n<N>, removed
            once merged (kept when a world size failed).
        scaling_config: passed on to the scaling suite.
        mpiexec: the launcher (default: `distbn.mpiexec.find_mpiexec`).
        timeout: seconds allowed per world size (None: no limit).
        log: where launcher lines go (default stderr).
        kernel_threads, cold_start: passed on to the kernel suite.

    Returns:
        (merged results or None if no run succeeded, list of failure messages).
    """
    from distbn.mpiexec import mpiexec_command, rank_env

    log = sys.stderr if log is None else log
    out_dir = Path(out_dir)
    env = rank_env()
    env["PYTHONUNBUFFERED"] = "1"
    cpus = os.cpu_count() or 1
    parts, failures = [], []
    for i, n in enumerate(ranks):
        these = [s for s in suites if s not in ONE_PROCESS or i == 0]
        if not these:
            continue
        part = out_dir / "parts" / f"n{n}"
        worker = _worker_argv(these, mode, part, scaling_config, kernel_threads, cold_start)
        cmd = mpiexec_command(n, worker, mpiexec=mpiexec)
        if n > cpus:
            print(f"[bench] warning: {n} ranks on {cpus} CPUs (oversubscribed): timings at "
                  "this world size measure contention, not scaling", file=log, flush=True)
        print(f"[bench] world size {n}: {shlex.join(cmd)}", file=log, flush=True)
        t0 = time.perf_counter()
        code = _run_group(cmd, env, timeout)
        if code != 0:
            what = f"timed out after {timeout} s" if code is None else f"exit code {code}"
            failures.append(f"world size {n}: mpiexec {what}")
            print(f"[bench] world size {n} failed ({what}); continuing", file=log, flush=True)
            continue
        res = read_results(part)
        # The part's own command line is the internal worker's; the caller sets the real one.
        res["environment"].pop("command", None)
        res["environment"]["oversubscribed"] = n > cpus
        res["environment"]["wall_s"] = round(time.perf_counter() - t0, 2)
        parts.append((f"n{n}", res))
    if not parts:
        return None, failures
    merged = merge_results(parts, tag_sources=False)
    merged["records"] += scaling.derive_efficiency(merged["records"])
    if not failures:  # everything is in the merge now; parts stay only to debug a failure
        shutil.rmtree(out_dir / "parts", ignore_errors=True)
    return merged, failures


def finish(results: dict, out_dir, report: bool = True) -> list[Path]:
    """Write results.json and (optionally) report.md and plots into `out_dir`.

    Args:
        results: {"environment", "records"}.
        out_dir: the directory.
        report: also write the report.

    Returns:
        The paths written.
    """
    from distbn.bench.report import write_report

    paths = [write_results(out_dir, results["environment"], results["records"])]
    if report:
        paths += write_report(read_results(out_dir), out_dir)
        note_missing_plots()
    return paths


def note_missing_plots(log=None) -> None:
    """Without matplotlib, say once how to get the plots (the tables are written)."""
    from distbn.plot import NO_MATPLOTLIB, have_matplotlib

    if not have_matplotlib():
        print(f"distbn bench: note: {NO_MATPLOTLIB}", file=log or sys.stderr, flush=True)
