"""Keras adapter MPI tests: one mpiexec launch per Keras backend.

The backend is fixed when keras is first imported (KERAS_BACKEND), so these tests live
outside tests/mpi (whose suite runs in one process per size) and are launched by
tests/test_keras_adapter_mpi.py once per backend and size. tests/mpi/conftest.py's rule
applies: a failure on any rank fails the test on every rank. A plain `pytest` does not
collect this directory.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

MPI_TESTS = Path(__file__).resolve().parent.parent / "mpi"
sys.path.insert(0, str(MPI_TESTS))  # comm_helpers, test_sync_bn_mpi.my_slice
os.environ.setdefault("KERAS_BACKEND", "jax")


def pytest_ignore_collect(collection_path, config):
    if not config.getoption("with_mpi", False) and collection_path.name.startswith("test_"):
        return True
    return None


def pytest_configure(config):
    if config.getoption("with_mpi", False):
        # tests/mpi/conftest.py under another module name: its `comm` fixture and its
        # all-ranks-fail hook, without a second copy of them here.
        spec = importlib.util.spec_from_file_location("distbn_mpi_conftest",
                                                      MPI_TESTS / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config.pluginmanager.register(module, "distbn_mpi_conftest")


@pytest.fixture
def backend():
    import keras

    return keras.backend.backend()
