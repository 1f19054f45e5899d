"""Running a test under both kernel backends (with the `restore_backend` fixture of
conftest.py, which puts the session's choice back afterwards)."""

from distbn.ops import backend


def both(fn):
    """fn() under the numpy reference and under the numba kernels: (numpy's, numba's)."""
    out = {}
    for name in ("numpy", "numba"):
        backend.set_backend(name)
        out[name] = fn()
    return out["numpy"], out["numba"]
