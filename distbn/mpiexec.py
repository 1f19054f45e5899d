"""Find and drive `mpiexec`: the launcher beside this Python (the mpich wheel) or on PATH."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["find_mpiexec", "mpiexec_flavour", "mpiexec_command", "rank_env", "THREAD_VARS"]

# Every threading knob a BLAS or JIT runtime reads: one thread per rank unless the user chose.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)


def find_mpiexec(explicit: str | None = None) -> str:
    """Return the mpiexec to use: `explicit`, then $DISTBN_MPIEXEC, then the one installed
    beside this Python (the venv's mpich wheel), then the first on PATH.

    Raises:
        FileNotFoundError: naming every place looked in.
    """
    candidates = []
    if explicit:
        candidates.append(explicit)
    if os.environ.get("DISTBN_MPIEXEC"):
        candidates.append(os.environ["DISTBN_MPIEXEC"])
    candidates.append(str(Path(sys.executable).parent / "mpiexec"))
    for cand in candidates:
        found = shutil.which(cand)
        if found:
            return found
        if explicit and cand == explicit:
            raise FileNotFoundError(f"mpiexec {explicit!r} not found or not executable")
    on_path = shutil.which("mpiexec")
    if on_path:
        return on_path
    raise FileNotFoundError(
        f"no mpiexec found (looked at $DISTBN_MPIEXEC, {candidates[-1]}, and PATH); "
        "install MPICH from PyPI (`pip install mpich`, or `pip install -e '.[mpich]'` in "
        "the distbn clone) or load your site's MPI (e.g. `module load mpich`)"
    )


@functools.cache
def mpiexec_flavour(mpiexec: str) -> str:
    """'hydra' (MPICH, Intel MPI), 'openmpi', or 'unknown', from `mpiexec --version`."""
    try:
        out = subprocess.run(
            [mpiexec, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if "HYDRA" in out or "Intel" in out:
        return "hydra"
    if "Open MPI" in out or "OpenRTE" in out or "PRRTE" in out:
        return "openmpi"
    return "unknown"


def mpiexec_command(
    nprocs: int,
    argv: list[str],
    *,
    mpiexec: str | None = None,
    hostfile: str | None = None,
    tag_output: bool = False,
) -> list[str]:
    """Build `mpiexec -n N [flags] argv...` for the launcher found by `find_mpiexec`.

    Open MPI needs --oversubscribe to run more ranks than cores (the tests run 3 ranks on 2);
    `tag_output` prefixes every line with its rank.
    """
    if int(nprocs) < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs!r}")
    exe = find_mpiexec(mpiexec)
    flavour = mpiexec_flavour(exe)
    cmd = [exe, "-n", str(int(nprocs))]
    if hostfile:
        cmd += ["-f" if flavour == "hydra" else "--hostfile", hostfile]
    if flavour == "openmpi":
        cmd.append("--oversubscribe")
    if tag_output:
        cmd.append("-prepend-rank" if flavour == "hydra" else "--tag-output")
    return cmd + list(argv)


def rank_env(env: dict | None = None) -> dict:
    """The environment of the ranks distbn starts: a copy of `env` (default os.environ)
    with one BLAS/OpenMP thread per rank, unless set."""
    out = dict(os.environ if env is None else env)
    for var in THREAD_VARS:
        out.setdefault(var, "1")
    return out
