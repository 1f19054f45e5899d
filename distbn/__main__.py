"""`python -m distbn` is the `distbn` command (also under `mpiexec ... -m mpi4py -m distbn`)."""

from distbn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
