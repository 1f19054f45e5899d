"""XLA FFI targets for the JAX path's collectives: no Python callback inside the step.

An `io_callback` re-enters Python from the XLA program (GIL, buffer wrapping, a break
in its schedule): ~0.35 ms each in the example's training step, two per synchronized
layer, a third of the step at 2 ranks. These two targets do the same host work in
numba (`distbn.ops.pooled_moments_compiled` over `distbn.distribute.native.sync_sum`,
which counts in the strategy's books) and are called with `jax.ffi.ffi_call`:

    distbn_bn_moments(desc, local(3, C), shift(C), moving_var(C)) -> mean, var, count
    distbn_bn_cotangents(desc, dmean(C), dvar(C)) -> [Σdmean, Σdvar] (2, C)

in float32 or float64, with `desc` the int64 `channel_descriptor` and epsilon's bits, as
int32 pairs (JAX without x64 has no int64). A handler is a plain C function of
XLA's typed FFI ABI (`xla/ffi/api/c_api.h`, API 0.x): it reads the call frame's
argument and result buffers and answers the metadata query XLA makes when the target
is registered. The side effect (an MPI collective) keeps XLA from removing or merging
calls; their order is the program's data order, the same on every rank.
"""

from __future__ import annotations

import numpy as np

__all__ = ["abi_supported", "register", "descriptor"]

_REGISTERED = []
_ABI = []

# XLA FFI ABI (c_api.h), in 8-byte words: XLA_FFI_CallFrame {struct_size, extension_start,
# api, ctx, stage, args{struct_size, extension_start, size, types, args}, rets{...}}.
_EXTENSION, _STAGE, _ARGS, _RETS = 1, 4, 9, 14
_EXECUTE, _METADATA = 3, 1  # XLA_FFI_ExecutionStage_EXECUTE, XLA_FFI_Extension_Metadata
# XLA_FFI_Buffer {struct_size, extension_start, dtype, data, rank, dims}
_DTYPE, _DATA = 2, 3
_F32 = 11  # XLA_FFI_DataType_F32 (F64 is 12)
_API_MAJOR, _API_MINOR = 0, 3  # the FFI header version these layouts are from
_DESC = 6  # int64 words of `descriptor`


def descriptor(strategy, name, epsilon):
    """The int32 view of `channel_descriptor(strategy, name)` and epsilon's bits."""
    from distbn.distribute.native import channel_descriptor

    channel = channel_descriptor(strategy, name)
    desc = np.empty(channel.size + 1, dtype=np.int64)
    desc[:-1] = channel
    desc[-1] = np.float64(epsilon).view(np.int64)
    return desc.view(np.int32)


def abi_supported() -> bool:
    """Whether the installed jaxlib's FFI major version is the one these layouts follow.

    A different one warns once and the callers keep the Python (io_callback) path.
    """
    if not _ABI:
        import os
        import re
        import warnings

        import jax

        header = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
        try:
            with open(header) as f:
                found = re.search(r"#define XLA_FFI_API_MAJOR (\d+)", f.read())
        except OSError:
            found = None
        major = None if found is None else int(found.group(1))
        _ABI.append(major == _API_MAJOR)
        if not _ABI[0]:
            warnings.warn(
                f"distbn.keras: jaxlib's XLA FFI API major version is {major!r} (read from "
                f"{header}), not {_API_MAJOR}: synchronized BN uses io_callbacks, slower",
                RuntimeWarning, stacklevel=3)
    return _ABI[0]


def register():
    """Compile (once per process) and register both targets with JAX."""
    if _REGISTERED:
        return
    import jax

    moments, cotangents = _make_handlers()
    jax.ffi.register_ffi_target("distbn_bn_moments", jax.ffi.pycapsule(moments.address),
                                platform="cpu")
    jax.ffi.register_ffi_target("distbn_bn_cotangents",
                                jax.ffi.pycapsule(cotangents.address), platform="cpu")
    _REGISTERED.append((moments, cotangents))  # the handlers live as long as the process


def _make_handlers():
    from numba import carray, cfunc, njit, types

    from distbn.distribute.native import pointer_intrinsic, sync_sum
    from distbn.ops.sync import pooled_moments_compiled

    reduce = sync_sum()
    pooled = pooled_moments_compiled()
    as_pointer = pointer_intrinsic()

    @njit
    def words(address, n):
        return carray(as_pointer(address), n, dtype=np.int64)

    @njit
    def answered_metadata(frame):
        """Fill XLA's metadata query (API version, no traits); False on a real call."""
        if frame[_EXTENSION] == 0:
            return False
        ext = words(frame[_EXTENSION], 4)  # {struct_size, type, next, metadata}
        if (ext[1] & 0xFFFFFFFF) != _METADATA:
            return False
        # XLA_FFI_Metadata {struct_size, api_version{struct_size, ext, major, minor}, traits}
        meta = words(ext[3], 5)
        meta[1], meta[2] = 24, 0
        halves = carray(as_pointer(ext[3]), 10, dtype=np.int32)
        halves[6], halves[7], halves[8] = _API_MAJOR, _API_MINOR, 0
        return True

    @njit
    def buffer(frame, slot, i):
        return words(words(frame[slot], i + 1)[i], 6)  # the i-th XLA_FFI_Buffer

    @njit
    def load(buf, n):
        if (buf[_DTYPE] & 0xFFFFFFFF) == _F32:
            return carray(as_pointer(buf[_DATA]), n, dtype=np.float32).astype(np.float64)
        return carray(as_pointer(buf[_DATA]), n, dtype=np.float64).copy()

    @njit
    def store(buf, values):
        if (buf[_DTYPE] & 0xFFFFFFFF) == _F32:
            carray(as_pointer(buf[_DATA]), values.size, dtype=np.float32)[:] = values
        else:
            carray(as_pointer(buf[_DATA]), values.size, dtype=np.float64)[:] = values

    @njit
    def channels(buf):
        rank = buf[4]
        dims = words(buf[5], max(rank, 1))
        n = 1
        for i in range(rank):
            n *= dims[i]
        return n

    null = 0

    @njit
    def executing(frame):
        """Whether this call is the execution (not the metadata query, not another stage)."""
        return not answered_metadata(frame) and (frame[_STAGE] & 0xFFFFFFFF) == _EXECUTE

    @njit
    def descriptor_arg(frame):
        return carray(as_pointer(buffer(frame, _ARGS, 0)[_DATA]), _DESC, dtype=np.int64)

    @cfunc(types.voidptr(types.voidptr))
    def moments(frame_address):
        frame = carray(frame_address, 16, dtype=np.int64)
        if not executing(frame):
            return as_pointer(null)
        desc = descriptor_arg(frame)
        shift_buf = buffer(frame, _ARGS, 2)
        c = channels(shift_buf)
        local = load(buffer(frame, _ARGS, 1), 3 * c)
        epsilon = desc[_DESC - 1:].view(np.float64)[0]
        mean, var, total = pooled(local[:c], local[c:2 * c], local[2 * c:],
                                  load(shift_buf, c), load(buffer(frame, _ARGS, 3), c),
                                  epsilon, reduce, desc)
        store(buffer(frame, _RETS, 0), mean)
        store(buffer(frame, _RETS, 1), var)
        store(buffer(frame, _RETS, 2), total)
        return as_pointer(null)

    @cfunc(types.voidptr(types.voidptr))
    def cotangents(frame_address):
        frame = carray(frame_address, 16, dtype=np.int64)
        if not executing(frame):
            return as_pointer(null)
        desc = descriptor_arg(frame)
        dm_buf = buffer(frame, _ARGS, 1)
        c = channels(dm_buf)
        both = np.empty(2 * c)
        both[:c], both[c:] = load(dm_buf, c), load(buffer(frame, _ARGS, 2), c)
        store(buffer(frame, _RETS, 0), reduce(desc, both))
        return as_pointer(null)

    return moments, cotangents
