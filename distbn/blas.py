"""Which kernels numpy's OpenBLAS runs: its core, and when it is held below the CPU.

OpenBLAS picks its kernels from the CPU, unless `OPENBLAS_CORETYPE` names a core. An
environment that pins an older core (this project's 2-core AMD Zen 5 VM sets
`OPENBLAS_CORETYPE=Haswell`, AVX2, though the CPU has AVX-512 and OpenBLAS would choose
SkylakeX) makes numpy's GEMMs (Conv2D, Dense) take ~1.6x the time (docs/benchmarks.md,
"BLAS kernels"). distbn reports it (`distbn info`, every benchmark's environment) and
never overrides a value the user set; the variable is read once, when OpenBLAS loads.
"""

from __future__ import annotations

import os

__all__ = ["openblas_core", "cpu_has_avx512", "held_below_cpu", "CORETYPE_ENV"]

CORETYPE_ENV = "OPENBLAS_CORETYPE"

# OpenBLAS x86 cores whose kernels stop at AVX2, as `openblas_get_corename` spells them.
_PRE_AVX512_CORES = ("haswell", "zen", "sandybridge", "nehalem", "core2", "prescott")
# What OpenBLAS's SkylakeX kernels need.
_AVX512_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def openblas_core() -> str | None:
    """The core OpenBLAS chose (`openblas_get_corename`) for numpy's BLAS, or None when
    numpy's BLAS is not an OpenBLAS this can find (the call is OpenBLAS's own)."""
    import ctypes
    import glob

    import numpy as np

    libs_dir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs_dir, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                       "openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                name = fn()
                return name.decode() if name else None
    return None


def cpu_has_avx512() -> bool:
    """Whether this machine's CPU (/proc/cpuinfo) has AVX-512 F, CD, BW, DQ and VL."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return _AVX512_FLAGS <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False


def held_below_cpu() -> bool:
    """True when numpy's OpenBLAS runs AVX2-or-older kernels on a CPU with the AVX-512
    subsets OpenBLAS's SkylakeX kernels use (e.g. an OPENBLAS_CORETYPE that pins them)."""
    core = openblas_core()
    return core is not None and core.lower() in _PRE_AVX512_CORES and cpu_has_avx512()
