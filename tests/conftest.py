"""Serial test session: tests/mpi runs through the mpiexec driver (test_mpi_suite.py)."""

import os
from pathlib import Path

import pytest

# Keras 3 picks its backend at import: the reference tests use JAX (the Keras adapter's
# own tests choose per process). Without it Keras would look for TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "jax")

MPI_DIR = Path(__file__).parent / "mpi"


def pytest_ignore_collect(collection_path, config):
    # A plain `pytest` leaves tests/mpi to the driver; `pytest --with-mpi` (under mpiexec)
    # or naming the directory collects it directly.
    if collection_path == MPI_DIR and not config.getoption("with_mpi", False):
        named = [Path(a.split("::")[0]).resolve() for a in config.args]
        if not any(p == MPI_DIR or MPI_DIR in p.parents for p in named):
            return True
    return None


@pytest.fixture
def restore_backend():
    """Puts the kernel backend chosen for the session back after a test that switches it."""
    from distbn.ops import backend

    saved = dict(backend._state)
    yield
    backend._state.update(saved)
