#!/usr/bin/env bash
# Run `distbn train` on N ranks with mpiexec (the venv's MPICH wheel or a site MPI).
#
#   launch/mpirun.sh CONFIG.yaml [distbn train options: --set k=v, --run-dir DIR, ...]
#
# Settings (environment variables):
#   NP=4                 number of ranks (default 2)
#   HOSTFILE=hosts.txt   one host per line, optionally "host:slots" (Hydra) or
#                        "host slots=N" (Open MPI); see launch/hostfile.example
#   MPIEXEC=mpiexec      the launcher (default: .venv/bin/mpiexec if present, else mpiexec)
#   PYTHON=python3       the Python with distbn installed (default: .venv/bin/python if
#                        present, else python3)
#   THREADS=1            BLAS/OpenMP/numba threads per rank (default 1: one rank per core)
#   BIND=core            bind each rank to a core ("core", "socket", "none"; default none)
#   PASS_ENV="A B"       extra environment variables to pass to every rank
#   EXTRA_MPI_ARGS="..." anything else for mpiexec
#   DRY_RUN=1            print the command instead of running it
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi

here=$(cd "$(dirname "$0")/.." && pwd)
NP=${NP:-2}
THREADS=${THREADS:-1}
BIND=${BIND:-none}
if [ -z "${MPIEXEC:-}" ]; then
  if [ -x "$here/.venv/bin/mpiexec" ]; then MPIEXEC="$here/.venv/bin/mpiexec"; else MPIEXEC=mpiexec; fi
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
case "$NP" in ''|*[!0-9]*) echo "mpirun.sh: NP must be a positive integer, got '$NP'" >&2; exit 2;; esac
[ "$NP" -ge 1 ] || { echo "mpirun.sh: NP must be >= 1, got '$NP'" >&2; exit 2; }

# Hydra (MPICH, Intel MPI) and Open MPI spell environment and binding options differently.
if "$MPIEXEC" --version 2>/dev/null | grep -q "Open MPI\|OpenRTE\|PRRTE"; then
  flavour=openmpi
else
  flavour=hydra
fi

cmd=("$MPIEXEC" -n "$NP")
[ -n "${HOSTFILE:-}" ] && { [ "$flavour" = openmpi ] && cmd+=(--hostfile "$HOSTFILE") || cmd+=(-f "$HOSTFILE"); }
vars=(OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS NUMBA_NUM_THREADS ${PASS_ENV:-})
for v in "${vars[@]}"; do
  case "$v" in
    *_NUM_THREADS) val=$THREADS ;;
    *) val=${!v:-} ;;
  esac
  if [ "$flavour" = openmpi ]; then cmd+=(-x "$v=$val"); else cmd+=(-genv "$v" "$val"); fi
done
if [ "$BIND" != none ]; then
  if [ "$flavour" = openmpi ]; then cmd+=(--bind-to "$BIND"); else cmd+=(-bind-to "$BIND"); fi
fi
# shellcheck disable=SC2206  # word splitting of EXTRA_MPI_ARGS is intended
[ -n "${EXTRA_MPI_ARGS:-}" ] && cmd+=(${EXTRA_MPI_ARGS})
cmd+=("$PYTHON" -m mpi4py -m distbn train "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
