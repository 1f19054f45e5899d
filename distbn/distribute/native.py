"""The strategy's sync-group sum for compiled code: MPI_Allreduce called from numba.

A Python callback from inside an XLA program costs ~0.3 ms in a training step (the GIL,
wrapping the buffers, a break in the program's schedule), and synchronized BN makes two
per layer and step. Compiled callers (the Keras adapter's XLA FFI handlers,
`distbn.keras._xla_ffi`) call this instead: `sync_sum()(desc, buf)` returns the sum of a
contiguous float64 buffer over the strategy's sync group with `MPI_Allreduce` through
ctypes, and keeps the strategy's books in the same counters as its Python collectives
(`collective_count`, `in_collective`, `last_collective`, so the stall watchdog sees a
native collective as it sees any other). An MPI error aborts the job (`MPI_Abort`), as
the abort hook does for an uncaught Python error: nothing can raise across XLA.

`desc` is the int64 array `channel_descriptor(strategy, name)` gives: the group's
communicator handle, the address of the strategy's counters, the name's index in the
strategy's table, a 20-bit tag of the name and the group's size. Each sum carries the
tag t and t² too: Σt² · size = (Σt)² only when every rank reached the same collective,
so ranks whose compiled programs issue them in different orders all see it in the same
sums and abort together, printing where, instead of mixing layers' statistics.

Check mode compares descriptors in Python, so it (and an armed DISTBN_FAULT point) has
no native form: `native_available` says when callers must take the Python path. The
decision is made when a program is traced: switching check mode on later applies to
programs traced after it.
"""

from __future__ import annotations

import ctypes
import os
import zlib

import numpy as np

__all__ = ["channel_descriptor", "native_available", "pointer_intrinsic", "sync_sum"]

_SUM = []  # the compiled sum, made on first use (mpi4py, ctypes and numba loaded then)
_POINTER = []


def native_available(strategy) -> bool:
    """Whether `strategy`'s sync-group sums may be made from compiled code."""
    return (getattr(strategy, "_native_comm", None) is not None and not strategy.check
            and not os.environ.get("DISTBN_FAULT"))


def channel_descriptor(strategy, name) -> np.ndarray:
    """[comm handle, counters address, name index, name tag, group size], int64."""
    from mpi4py import MPI

    names = strategy._native_names
    if name not in names:
        names.append(name)
    counts = strategy._counts
    tag = zlib.crc32(str(name).encode()) & 0xFFFFF  # t² · size stays exact in float64
    return np.array([_signed(MPI._handleof(strategy._native_comm)), counts.ctypes.data,
                     names.index(name), tag, strategy.sync_group_size], dtype=np.int64)


def _signed(handle: int) -> int:
    """mpi4py gives a handle as an unsigned 64-bit int; C sees int (MPICH) or a pointer."""
    return handle - (1 << 64) if handle >= 1 << 63 else handle


def sync_sum():
    """The numba function `sum(desc, buf)`: the MPI sum of float64 `buf` over desc's group."""
    if not _SUM:
        _SUM.append(_make_sync_sum())
    return _SUM[0]


def pointer_intrinsic():
    """A numba intrinsic: `as_pointer(address)` turns an int64 address into a void*."""
    if not _POINTER:
        from numba import types
        from numba.core import cgutils
        from numba.extending import intrinsic

        @intrinsic
        def as_pointer(typingctx, address):
            def codegen(context, builder, sig, args):
                return builder.inttoptr(args[0], cgutils.voidptr_t)
            return types.voidptr(address), codegen

        _POINTER.append(as_pointer)
    return _POINTER[0]


def _make_sync_sum():
    from mpi4py import MPI
    from numba import carray, njit

    lib = ctypes.CDLL(MPI.__file__)  # dlsym searches its dependency, libmpi
    handle = ctypes.c_int if MPI._sizeof(MPI.Comm) == 4 else ctypes.c_void_p
    allreduce = lib.MPI_Allreduce
    allreduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, handle, handle,
                          handle]
    allreduce.restype = ctypes.c_int
    libc = ctypes.CDLL(None)
    flush = libc.fflush  # numba's print is C stdio: flush it before MPI_Abort
    flush.argtypes = [ctypes.c_void_p]
    flush.restype = ctypes.c_int
    abort = lib.MPI_Abort
    abort.argtypes = [handle, ctypes.c_int]
    abort.restype = ctypes.c_int
    f64, op_sum, world = (_signed(MPI._handleof(MPI.DOUBLE)), _signed(MPI._handleof(MPI.SUM)),
                          _signed(MPI._handleof(MPI.COMM_WORLD)))
    pointer_handles = handle is ctypes.c_void_p

    as_pointer = pointer_intrinsic()

    @njit
    def h(value):
        return as_pointer(value) if pointer_handles else np.int32(value)

    @njit
    def summed(desc, buf):
        counts = carray(as_pointer(desc[1]), 4, dtype=np.int64)
        counts[0] += 1  # started: the watchdog and collective_count see it
        counts[2] = counts[0]  # the last collective's number and name, for reports
        counts[3] = desc[2]
        n = buf.size
        # Send and receive halves of one allocation: read after the call, it stays alive
        # through it (numba may free an array whose last use is taking its address, and
        # another thread may reuse the memory before MPI reads it). Not MPI_IN_PLACE,
        # whose value differs between MPI libraries.
        work = np.empty(2 * (n + 2))
        send, out = work[:n + 2], work[n + 2:]
        send[:n] = buf
        send[n], send[n + 1] = desc[3], desc[3] * desc[3]
        err = allreduce(as_pointer(send.ctypes.data), as_pointer(out.ctypes.data),
                        np.int32(n + 2), h(f64), h(op_sum), h(desc[0]))
        if err != 0:
            print("distbn: MPI_Allreduce failed in compiled collective #", counts[0],
                  "with error code", err, "; aborting the job")
            flush(as_pointer(0))
            abort(h(world), np.int32(1))
        if out[n] * out[n] != desc[4] * out[n + 1]:
            print("distbn: ranks reached different synchronized BN collectives at #",
                  counts[0], "(the compiled programs order them differently); aborting")
            flush(as_pointer(0))
            abort(h(world), np.int32(1))
        counts[1] += 1
        return out[:n]

    return summed
