"""Serial test session: tests/mpi runs through the mpiexec driver (test_mpi_suite.py)."""

from pathlib import Path

MPI_DIR = Path(__file__).parent / "mpi"


def pytest_ignore_collect(collection_path, config):
    # A plain `pytest` leaves tests/mpi to the driver; `pytest --with-mpi` (under mpiexec)
    # or naming the directory collects it directly.
    if collection_path == MPI_DIR and not config.getoption("with_mpi", False):
        named = [Path(a.split("::")[0]).resolve() for a in config.args]
        if not any(p == MPI_DIR or MPI_DIR in p.parents for p in named):
            return True
    return None
