"""Which batch-norm kernels run: the numpy reference or the fused numba ones.

`DISTBN_KERNELS=numpy|numba` chooses; unset (or empty) means the fastest available:
numba when it imports, else numpy. An explicit `numba` without a working numba, or any
other value, is an error that quotes the value. The choice is made on first use (the
first `kernels()` or `backend_name()` call), so importing distbn never imports numba.

Threads (numba backend): `NUMBA_NUM_THREADS` is numba's own and wins; else
`OMP_NUM_THREADS`; else one thread per rank when the process is one of several MPI
ranks (judged from the launcher's environment, as `get_strategy()` does); else numba's
default (every core). The count is applied once, on the thread that selects the
backend (numba's setting is per thread).
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["ENV_VAR", "BACKENDS", "kernels", "backend_name", "backend_info", "set_backend",
           "requested_backend", "default_threads"]

ENV_VAR = "DISTBN_KERNELS"
BACKENDS = ("numpy", "numba")

_state: dict = {"module": None, "name": None, "info": {}}


def requested_backend(environ=None) -> str | None:
    """The backend `DISTBN_KERNELS` asks for: "numpy", "numba", or None (the default).

    Args:
        environ: the environment mapping (default os.environ).

    Returns:
        The lower-cased name, or None when the variable is unset or empty.

    Raises:
        ValueError: for any other value, quoting it.
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV_VAR)
    if raw is None or not raw.strip():
        return None
    value = raw.strip().lower()
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR} must be one of {', '.join(BACKENDS)} (or unset for the fastest "
            f"available), got {ENV_VAR}={raw!r}"
        )
    return value


def default_threads(environ=None, numba_max: int | None = None,
                    launched: int | None = None) -> int | None:
    """The thread count distbn sets for numba, or None to leave numba's own.

    Args:
        environ: the environment mapping (default os.environ).
        numba_max: numba's pool size (`numba.config.NUMBA_NUM_THREADS`); caps the result.
        launched: the number of ranks started (default: judged from the environment and
            an already initialised MPI).

    Returns:
        None when NUMBA_NUM_THREADS is set (numba applies it) or nothing asks for a
        count; the OMP_NUM_THREADS value when set; 1 under a multi-rank MPI launch.
    """
    env = os.environ if environ is None else environ
    if env.get("NUMBA_NUM_THREADS", "").strip():
        return None
    omp = _positive_int(env.get("OMP_NUM_THREADS", "").split(",")[0])
    if omp is not None:
        return omp if numba_max is None else min(omp, numba_max)
    if launched is None:
        from distbn.launchenv import current_world_size

        launched = current_world_size(env)
    return 1 if launched > 1 else None


def _positive_int(text) -> int | None:
    try:
        n = int(str(text).strip())
    except ValueError:
        return None
    return n if n > 0 else None


def _load_numba(explicit: bool):
    """The fused module and its info, or (None, reason) when numba is unusable."""
    try:
        import numba

        from distbn.ops import fused
    except Exception as exc:  # ImportError, or a numba/numpy version clash at import
        if explicit:
            raise RuntimeError(
                f"{ENV_VAR}='numba' asks for the fused kernels, but numba cannot be "
                f"imported ({type(exc).__name__}: {exc}); install it with "
                "`pip install numba` (a dependency of distbn) or set DISTBN_KERNELS=numpy"
            ) from exc
        return None, f"numba not importable ({type(exc).__name__}: {exc})"
    threads = default_threads(numba_max=numba.config.NUMBA_NUM_THREADS)
    if threads is not None:
        numba.set_num_threads(threads)
    info = {"numba": numba.__version__, "threads": int(numba.get_num_threads()),
            "threading_layer_config": numba.config.THREADING_LAYER}
    return fused, info


def set_backend(name: str | None = None) -> str:
    """Select the kernels: "numpy", "numba", or None to read `DISTBN_KERNELS` again.

    Args:
        name: the backend name, or None for the environment's choice (default: fastest).

    Returns:
        The active backend's name.

    Raises:
        ValueError: an unknown name (or environment value), quoted.
        RuntimeError: "numba" asked for explicitly, but numba does not import.
    """
    if name is None:
        choice, source = requested_backend(), "environment"
    else:
        choice, source = str(name).strip().lower(), "set_backend"
        if choice not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    from distbn.ops import batch_norm

    module, info = batch_norm, {}
    if choice in (None, "numba"):
        fused, detail = _load_numba(explicit=choice == "numba")
        if fused is not None:
            module, info = fused, detail
        else:
            info = {"fallback": detail}
    name = "numba" if module is not batch_norm else "numpy"
    info.update(selected_by=source if choice else "default")
    _state.update(module=module, name=name, info=info)
    return name


def kernels() -> ModuleType:
    """The active kernel module (`distbn.ops.fused` or `distbn.ops.batch_norm`).

    Both provide `local_mean_m2`, `normalize`, `backward_sums`, `input_grad` and the
    channel-array helpers with the same signatures and results.
    """
    module = _state["module"]
    if module is None:
        set_backend(None)
        module = _state["module"]
    return module


def backend_name() -> str:
    """The active backend: "numba" (fused kernels) or "numpy" (the reference)."""
    kernels()
    return _state["name"]


def backend_info() -> dict:
    """The active backend's details: name, numba version and threads, why numpy, etc."""
    kernels()
    return {"name": _state["name"], **_state["info"]}
