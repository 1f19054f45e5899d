"""Run tests/mpi_keras under mpiexec at 2 and 3 ranks, once per Keras backend.

The Keras backend is fixed per process by KERAS_BACKEND, so each backend gets its own
launch (the tests/mpi suite runs in one process per size). A failure or a hang fails
the test. Skipped without keras or the backend's package.
"""

import importlib.util
import os

import pytest
from mpi_driver import run_mpi_pytest

# XLA's LLVM optimisation level 0: the tests' tiny jitted steps compile several times
# faster, and results stay within float32 rounding of the reference.
JAX_TEST_FLAGS = "--xla_backend_optimization_level=0"


# One launch per backend (each pays the Keras import and the jit compiles): JAX at 3
# ranks (uneven shards), torch at 2, each running the layer and the fit equivalence --
# the suite's time budget (10 minutes on 2 cores). Both sizes on both backends:
# `pytest tests/mpi_keras` under `mpiexec -n 2` and `-n 3`.
LAUNCHES = [("jax", 3, "tests/mpi_keras"), ("torch", 2, "tests/mpi_keras")]


@pytest.mark.parametrize("backend,nprocs,path", LAUNCHES)
def test_keras_adapter_mpi(backend, nprocs, path, monkeypatch):
    for module in ("keras", backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (the keras/torch extras)")
    monkeypatch.setenv("KERAS_BACKEND", backend)
    if backend == "jax":
        monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {JAX_TEST_FLAGS}")
    run = run_mpi_pytest(nprocs, [path], timeout=240, per_test_timeout=150)
    if run.returncode != 0 or run.timed_out:
        pytest.fail(run.failure_report(), pytrace=False)
    assert " passed" in run.output and " skipped" not in run.output, run.failure_report()
