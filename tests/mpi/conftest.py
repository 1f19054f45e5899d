"""MPI test session: a failure on any rank fails the test on every rank.

After each test the ranks exchange their outcome on a private duplicate of COMM_WORLD,
so one rank's failed assertion is reported everywhere instead of leaving the others to
pass alone (or to wait). Write tests so that every rank reaches the same collectives,
then asserts.
"""

import pytest
from mpi4py import MPI

_OUTCOMES = MPI.COMM_WORLD.Dup()


@pytest.fixture
def comm():
    """A fresh duplicate of COMM_WORLD per test, freed afterwards."""
    c = MPI.COMM_WORLD.Dup()
    yield c
    c.Free()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    failed_here = None
    try:
        return (yield)
    except BaseException as exc:
        failed_here = exc
        raise
    finally:
        failed = _OUTCOMES.allgather(failed_here is not None and not _is_skip(failed_here))
        others = [r for r, f in enumerate(failed) if f and r != _OUTCOMES.rank]
        if others and failed_here is None:
            pytest.fail(f"failed on rank(s) {others}", pytrace=False)


def _is_skip(exc):
    return isinstance(exc, pytest.skip.Exception)
