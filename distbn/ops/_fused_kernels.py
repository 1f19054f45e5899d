"""numba kernels behind `distbn.ops.fused`: one pass over the data each, float64 sums.

Imported only when numba is installed (`distbn.ops.fused` imports it lazily). Two
geometries cover every supported input, both C-contiguous views, no copies:

* "rows", `x2` of shape (R, C): the channels are the trailing axes (channels-last,
  and any layout whose reduced axes all precede the channel axes).
* "planes", `x3` of shape (O, C, I): channels in the middle, I > 1 reduced positions
  after each channel (channels-first). Elementwise kernels see it as (O*C, I).

Reductions split the reduced positions into blocks whose bounds depend only on the
shape, never on the thread count; each block is summed sequentially and the blocks are
merged in index order, so the same input gives the same bits at any thread count.
Statistics are shifted per block by one of the block's own values (so cancellation in
Σ(x−K)² − (Σ(x−K))²/n costs at most a factor of the block size) and merged with Chan's
formula.

Masks: `rmask` (R,) for rows, `pmask` (O, C) for planes, one flag per row (a position's
flag for every channel in rows, for every one of the I positions in planes); None
means every position counts. Other mask shapes are handled by the numpy reference.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core.extending import intrinsic

__all__ = [
    "rows_moments", "planes_moments", "rows_normalize", "planes_normalize", "rows_affine",
    "planes_affine", "rows_grad_sums", "planes_grad_sums", "rows_input_grad",
    "planes_input_grad", "rows_train_forward", "planes_train_forward",
    "planes_train_backward", "rows_train_backward", "rows_normalize_wide",
    "rows_input_grad_wide",
]

# Reductions along the contiguous axis (planes) need reassociation for LLVM to
# vectorise them; the order it picks is fixed at compile time, so results stay
# deterministic. Reductions across rows vectorise over the channels without it; both
# fuse multiply-adds. Elementwise kernels use neither and round like the numpy reference.
_REDUCE_MATH = {"reassoc", "contract"}
_ROWS_MATH = {"contract"}

# Software prefetch this far ahead in the rows kernels: it brings the statistics pass
# and the normalisation (output prefetched for writing) to the machine's read-only and
# copy bandwidth. The planes reductions sweep memory in order and are faster without.
# The timings: docs/numerics.md, "Kernel design notes".
_PF_BYTES = 2048
_LINE_BYTES = 64
# ...but only on short rows. The hints go out a row at a time, and on long rows they
# crowd the core's outstanding misses, while the hardware prefetcher follows long
# contiguous runs by itself: long rows were slower with prefetching, short ones faster
# (docs/numerics.md, "Kernel design notes"). Rows of up to this many bytes, summed over
# the input streams read, are prefetched.
_PF_MAX_ROW_BYTES = 1024


def _prefetch_codegen(write):
    """LLVM for `llvm.prefetch(&flat[index], write, locality 3, data)`."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [ptr.type], fnty)
        # (address, 0 read / 1 write, locality 3: keep in all levels, 1: data cache)
        builder.call(fn, [ptr, i32(int(write)), i32(3), i32(1)])
        return context.get_dummy_value()
    return codegen


@intrinsic
def _prefetch(typingctx, flat, index):
    """Hint the CPU to load the cache line of `flat[index]` (no effect on results)."""
    if isinstance(flat, types.Array) and isinstance(index, types.Integer):
        return types.void(flat, index), _prefetch_codegen(write=False)
    return None


@intrinsic
def _prefetch_w(typingctx, flat, index):
    """Hint the CPU to own the cache line of `flat[index]`, to be written."""
    if isinstance(flat, types.Array) and isinstance(index, types.Integer):
        return types.void(flat, index), _prefetch_codegen(write=True)
    return None


@njit(inline="always")
def _prefetch_pays(row_bytes):
    """Whether software prefetching helps rows of `row_bytes` (over all input streams)."""
    return row_bytes <= _PF_MAX_ROW_BYTES


@njit(inline="always")
def _prefetch_span(flat, start, stop):
    """Prefetch `flat[start:stop]` (clipped to the array), one hint per cache line."""
    step = max(1, _LINE_BYTES // flat.itemsize)
    for i in range(max(start, 0), min(stop, flat.size), step):
        _prefetch(flat, i)


@njit(inline="always")
def _prefetch_w_span(flat, start, stop):
    """`_prefetch_span` for lines about to be written (saves the store's ownership wait)."""
    step = max(1, _LINE_BYTES // flat.itemsize)
    for i in range(max(start, 0), min(stop, flat.size), step):
        _prefetch_w(flat, i)


@njit(cache=True, error_model="numpy")  # no zero-division checks: nb > 0, n > 0 below
def _merge_moments(part, count, mean, m2):
    """Chan-merge per-block [n, K, Σ(x−K), Σ(x−K)²] (shape (4, blocks, C)) in block order."""
    nblocks, nch = part.shape[1], part.shape[2]
    for b in range(nblocks):
        for c in range(nch):
            nb = part[0, b, c]
            if nb == 0.0:
                continue
            s1 = part[2, b, c]
            mb = part[1, b, c] + s1 / nb
            m2b = max(part[3, b, c] - s1 * (s1 / nb), 0.0)
            na = count[c]
            n = na + nb
            delta = mb - mean[c]
            mean[c] += delta * (nb / n)
            m2[c] += m2b + delta * delta * (na * (nb / n))
            count[c] = n


@njit(parallel=True, cache=True, fastmath=_ROWS_MATH)
def rows_moments(x2, rmask, rows_per_block):
    """Per-channel float64 (count, mean, M2) of `x2` (R, C) over the unmasked rows.

    Args:
        x2: float32/float64 (R, C), C-contiguous.
        rmask: None, or bool (R,): rows that enter the statistics.
        rows_per_block: block length (a function of the input shape only).

    Returns:
        (count, mean, m2): float64 (C,); mean = m2 = 0 where count = 0.
    """
    nrow, nch = x2.shape
    flat = x2.reshape(x2.size)
    ahead = _PF_BYTES // x2.itemsize
    pf = _prefetch_pays(x2.itemsize * nch)
    nrb = (nrow + rows_per_block - 1) // rows_per_block
    part = np.zeros((4, nrb, nch))
    for rb in prange(nrb):
        r0 = rb * rows_per_block
        r1 = min(nrow, r0 + rows_per_block)
        first = r0
        if rmask is not None:
            while first < r1 and not rmask[first]:
                first += 1
        if first < r1:
            # Loops over range(nch) from 0: numba then drops its negative-index
            # handling and LLVM vectorises across the channels.
            k = np.empty(nch)
            s1 = np.zeros(nch)
            s2 = np.zeros(nch)
            for c in range(nch):
                k[c] = x2[first, c]
            n = 0
            if rmask is None:
                r = first
                # Four rows per sweep: a quarter of the accumulator loads and stores,
                # which otherwise bound the loop (one sub, add and fma per element).
                while r + 4 <= r1:
                    if pf:
                        _prefetch_span(flat, r * nch + ahead, (r + 4) * nch + ahead)
                    for c in range(nch):
                        kc = k[c]
                        d0 = np.float64(x2[r, c]) - kc
                        d1 = np.float64(x2[r + 1, c]) - kc
                        d2 = np.float64(x2[r + 2, c]) - kc
                        d3 = np.float64(x2[r + 3, c]) - kc
                        a = s1[c] + d0
                        q = s2[c] + d0 * d0
                        a = a + d1
                        q = q + d1 * d1
                        a = a + d2
                        q = q + d2 * d2
                        s1[c] = a + d3
                        s2[c] = q + d3 * d3
                    r += 4
                while r < r1:
                    for c in range(nch):
                        d0 = np.float64(x2[r, c]) - k[c]
                        s1[c] += d0
                        s2[c] += d0 * d0
                    r += 1
                n = r1 - first
            else:
                for r in range(first, r1):
                    if pf:
                        _prefetch_span(flat, r * nch + ahead, (r + 1) * nch + ahead)
                    if rmask[r]:
                        n += 1
                        for c in range(nch):
                            d0 = np.float64(x2[r, c]) - k[c]
                            s1[c] += d0
                            s2[c] += d0 * d0
            for c in range(nch):
                part[0, rb, c] = n
                part[1, rb, c] = k[c]
                part[2, rb, c] = s1[c]
                part[3, rb, c] = s2[c]
    count = np.zeros(nch)
    mean = np.zeros(nch)
    m2 = np.zeros(nch)
    _merge_moments(part, count, mean, m2)
    return count, mean, m2


@njit(inline="always")
def _plane_sums(x3, o, c, k):
    """Σ(x−k) and Σ(x−k)² over the contiguous row x3[o, c, :], in float64."""
    t1 = 0.0
    t2 = 0.0
    for i in range(x3.shape[2]):
        d = np.float64(x3[o, c, i]) - k
        t1 += d
        t2 += d * d
    return t1, t2


@njit(inline="always")
def _plane_sums4(x3, o, c, k0, k1, k2, k3):
    """`_plane_sums` of the four rows x3[o, c:c+4, :] in one sweep.

    Four independent pairs of accumulators: one row's sums are a chain of dependent
    adds, which at one row per loop bounds the statistics pass; four rows bring it near
    the read-only bandwidth (docs/numerics.md, "Kernel design notes").
    Each row's sums are `_plane_sums`' up to the order of the additions.
    """
    a0 = q0 = a1 = q1 = a2 = q2 = a3 = q3 = 0.0
    for i in range(x3.shape[2]):
        d0 = np.float64(x3[o, c, i]) - k0
        d1 = np.float64(x3[o, c + 1, i]) - k1
        d2 = np.float64(x3[o, c + 2, i]) - k2
        d3 = np.float64(x3[o, c + 3, i]) - k3
        a0 += d0
        q0 += d0 * d0
        a1 += d1
        q1 += d1 * d1
        a2 += d2
        q2 += d2 * d2
        a3 += d3
        q3 += d3 * d3
    return a0, q0, a1, q1, a2, q2, a3, q3


@njit(inline="always")
def _add_plane(part, ob, c, n, t1, t2):
    """Add one row's count and sums to block `ob`'s partial sums of channel c."""
    part[0, ob, c] += n
    part[2, ob, c] += t1
    part[3, ob, c] += t2


@njit(parallel=True, cache=True, fastmath=_REDUCE_MATH)
def planes_moments(x3, pmask, outer_per_block, chan_per_block):
    """Per-channel float64 (count, mean, M2) of `x3` (O, C, I) over the unmasked rows.

    A block is a range of outer positions times a range of channels, swept in memory
    order: one stream, which the hardware prefetchers follow (software prefetching
    measured slower here, unlike for rows).

    Args:
        x3: float32/float64 (O, C, I), C-contiguous.
        pmask: None, or bool (O, C): the (o, c) rows that enter the statistics.
        outer_per_block, chan_per_block: block shape (a function of the input shape only).

    Returns:
        (count, mean, m2): float64 (C,); mean = m2 = 0 where count = 0.
    """
    nout, nch, inner = x3.shape
    nob = (nout + outer_per_block - 1) // outer_per_block
    ncb = (nch + chan_per_block - 1) // chan_per_block
    part = np.zeros((4, nob, nch))  # [n, K, Σ(x−K), Σ(x−K)²] per block and channel
    for blk in prange(nob * ncb):
        ob = blk // ncb
        c0 = (blk - ob * ncb) * chan_per_block
        c1 = min(nch, c0 + chan_per_block)
        o0 = ob * outer_per_block
        o1 = min(nout, o0 + outer_per_block)
        for c in range(c0, c1):  # each channel's shift: its first row in the block
            first = o0
            if pmask is not None:
                while first < o1 and not pmask[first, c]:
                    first += 1
            if first < o1:
                part[1, ob, c] = x3[first, c, 0]
        for o in range(o0, o1):
            rest = c0  # rows before `rest` are done four at a time
            if pmask is None:
                while rest + 4 <= c1:
                    c = rest
                    a0, q0, a1, q1, a2, q2, a3, q3 = _plane_sums4(
                        x3, o, c, part[1, ob, c], part[1, ob, c + 1], part[1, ob, c + 2],
                        part[1, ob, c + 3])
                    _add_plane(part, ob, c, inner, a0, q0)
                    _add_plane(part, ob, c + 1, inner, a1, q1)
                    _add_plane(part, ob, c + 2, inner, a2, q2)
                    _add_plane(part, ob, c + 3, inner, a3, q3)
                    rest += 4
            for c in range(rest, c1):  # the rest, and every row when there is a mask
                if pmask is not None:
                    if not pmask[o, c]:
                        continue
                t1, t2 = _plane_sums(x3, o, c, part[1, ob, c])
                _add_plane(part, ob, c, inner, t1, t2)
    count = np.zeros(nch)
    mean = np.zeros(nch)
    m2 = np.zeros(nch)
    _merge_moments(part, count, mean, m2)
    return count, mean, m2


@njit(inline="always", error_model="numpy")
def _normalize_coefficients(mean, var, gamma, beta, epsilon, use_gamma, use_beta, dtype):
    """Per-channel scale and offset in `dtype`, by the numpy reference's arithmetic.

    scale = γ/√(var+ε), offset = β − mean·scale, rounded to float64 step by step as the
    reference does, then cast once; so the two backends normalise with the same bits.
    """
    nch = mean.shape[0]
    scale = np.empty(nch, dtype=dtype)
    offset = np.empty(nch, dtype=dtype)
    for c in range(nch):
        s = 1.0 / np.sqrt(var[c] + epsilon)
        if use_gamma:
            s = s * gamma[c]
        f = -mean[c] * s
        if use_beta:
            f = f + beta[c]
        scale[c] = s
        offset[c] = f
    return scale, offset


@njit(cache=True, error_model="numpy")
def rows_normalize(x2, mean, var, gamma, beta, epsilon, use_gamma, use_beta, out,
                   rows_per_block):
    """`out = γ(x − mean)/√(var + ε) + β` per channel of (R, C) rows, one pass.

    Args:
        x2: (R, C) input; out: its (R, C) output, same dtype.
        mean, var, gamma, beta: float64 (C,); gamma/beta are ignored unless use_gamma /
            use_beta (any (C,) array may stand in: no None-specialised copies to compile).
        epsilon: float.
        use_gamma, use_beta: bools.
        rows_per_block: rows per parallel task.
    """
    scale, offset = _normalize_coefficients(mean, var, gamma, beta, epsilon, use_gamma,
                                            use_beta, x2.dtype)
    rows_affine(x2, scale, offset, out, rows_per_block)


@njit(cache=True, error_model="numpy")
def planes_normalize(x2, mean, var, gamma, beta, epsilon, use_gamma, use_beta, out, nch,
                     rows_per_block):
    """`rows_normalize` for (O*C, I) rows whose channel is `row % nch`."""
    scale, offset = _normalize_coefficients(mean, var, gamma, beta, epsilon, use_gamma,
                                            use_beta, x2.dtype)
    planes_affine(x2, scale, offset, out, nch, rows_per_block)


@njit(parallel=True, cache=True)
def rows_affine(x2, scale, offset, out, rows_per_block):
    """`out = x2 * scale + offset` per channel (the last axis); scale/offset in x's dtype.

    Args:
        x2: (R, C) input; out: (R, C) output of the same dtype (may be x2's dtype only).
        scale, offset: (C,) arrays in x's dtype.
        rows_per_block: rows per parallel task.
    """
    nrow, nch = x2.shape
    flat = x2.reshape(x2.size)
    oflat = out.reshape(out.size)
    ahead = _PF_BYTES // x2.itemsize
    pf = _prefetch_pays(x2.itemsize * nch)
    nrb = (nrow + rows_per_block - 1) // rows_per_block
    for it in prange(nrb):
        rb = nrb - 1 - it  # last block first: the end of x may still be in cache
        for r in range(rb * rows_per_block, min(nrow, (rb + 1) * rows_per_block)):
            if pf:
                _prefetch_span(flat, r * nch + ahead, (r + 1) * nch + ahead)
                _prefetch_w_span(oflat, r * nch + ahead, (r + 1) * nch + ahead)
            for c in range(nch):
                out[r, c] = x2[r, c] * scale[c] + offset[c]


@njit(parallel=True, cache=True)
def planes_affine(x2, scale, offset, out, nch, rows_per_block):
    """`out = x2 * scale + offset` for (O*C, I) rows whose channel is `row % nch`.

    Args:
        x2: (O*C, I) input; out: its (O*C, I) output.
        scale, offset: (C,) arrays in x's dtype.
        nch: C.
        rows_per_block: rows per parallel task.
    """
    nrow, inner = x2.shape
    flat = x2.reshape(x2.size)
    oflat = out.reshape(out.size)
    ahead = _PF_BYTES // x2.itemsize
    pf = _prefetch_pays(x2.itemsize * inner)
    nrb = (nrow + rows_per_block - 1) // rows_per_block
    for it in prange(nrb):
        rb = nrb - 1 - it  # last block first: the end of x may still be in cache
        for r in range(rb * rows_per_block, min(nrow, (rb + 1) * rows_per_block)):
            if pf:
                _prefetch_span(flat, r * inner + ahead, (r + 1) * inner + ahead)
                _prefetch_w_span(oflat, r * inner + ahead, (r + 1) * inner + ahead)
            c = r % nch
            s = scale[c]
            f = offset[c]
            for i in range(inner):
                out[r, i] = x2[r, i] * s + f


@njit(parallel=True, cache=True, fastmath=_ROWS_MATH)
def rows_grad_sums(dy2, x2, mean, rows_per_block):
    """Per-channel float64 [Σdy, Σdy·(x−mean)] over all rows of (R, C) arrays.

    Args:
        dy2, x2: (R, C) arrays of one dtype.
        mean: float64 (C,).
        rows_per_block: block length (a function of the input shape only).

    Returns:
        float64 (2, C).
    """
    nrow, nch = x2.shape
    gflat = dy2.reshape(dy2.size)
    flat = x2.reshape(x2.size)
    ahead = _PF_BYTES // x2.itemsize
    pf = _prefetch_pays(x2.itemsize * nch * 2)
    nrb = (nrow + rows_per_block - 1) // rows_per_block
    part = np.zeros((2, nrb, nch))
    for rb in prange(nrb):
        r0 = rb * rows_per_block
        r1 = min(nrow, r0 + rows_per_block)
        a1 = np.zeros(nch)
        a2 = np.zeros(nch)
        r = r0
        while r + 4 <= r1:  # four rows per sweep, as in rows_moments
            if pf:
                _prefetch_span(gflat, r * nch + ahead, (r + 4) * nch + ahead)
                _prefetch_span(flat, r * nch + ahead, (r + 4) * nch + ahead)
            for c in range(nch):
                mc = mean[c]
                g0 = np.float64(dy2[r, c])
                g1 = np.float64(dy2[r + 1, c])
                g2 = np.float64(dy2[r + 2, c])
                g3 = np.float64(dy2[r + 3, c])
                a = a1[c] + g0
                q = a2[c] + g0 * (np.float64(x2[r, c]) - mc)
                a = a + g1
                q = q + g1 * (np.float64(x2[r + 1, c]) - mc)
                a = a + g2
                q = q + g2 * (np.float64(x2[r + 2, c]) - mc)
                a1[c] = a + g3
                a2[c] = q + g3 * (np.float64(x2[r + 3, c]) - mc)
            r += 4
        while r < r1:
            for c in range(nch):
                g0 = np.float64(dy2[r, c])
                a1[c] += g0
                a2[c] += g0 * (np.float64(x2[r, c]) - mean[c])
            r += 1
        for c in range(nch):
            part[0, rb, c] = a1[c]
            part[1, rb, c] = a2[c]
    out = np.zeros((2, nch))
    for b in range(nrb):  # block order: deterministic
        for c in range(nch):
            out[0, c] += part[0, b, c]
            out[1, c] += part[1, b, c]
    return out


@njit(inline="always")
def _plane_grad_row(dy3, x3, o, c, mu):
    """Σdy and Σdy·(x−mu) over the contiguous row (o, c, :), in float64."""
    t1 = 0.0
    t2 = 0.0
    for i in range(x3.shape[2]):
        g = np.float64(dy3[o, c, i])
        t1 += g
        t2 += g * (np.float64(x3[o, c, i]) - mu)
    return t1, t2


@njit(parallel=True, cache=True, fastmath=_REDUCE_MATH)
def planes_grad_sums(dy3, x3, mean, outer_per_block, chan_per_block):
    """Per-channel float64 [Σdy, Σdy·(x−mean)] over all positions of (O, C, I) arrays.

    Args:
        dy3, x3: (O, C, I) arrays of one dtype.
        mean: float64 (C,).
        outer_per_block, chan_per_block: block shape (a function of the input shape only;
            blocks are swept in memory order, as in planes_moments).

    Returns:
        float64 (2, C).
    """
    nout, nch, _ = x3.shape
    nob = (nout + outer_per_block - 1) // outer_per_block
    ncb = (nch + chan_per_block - 1) // chan_per_block
    part = np.zeros((2, nob, nch))
    for blk in prange(nob * ncb):
        ob = blk // ncb
        c0 = (blk - ob * ncb) * chan_per_block
        c1 = min(nch, c0 + chan_per_block)
        for o in range(ob * outer_per_block, min(nout, (ob + 1) * outer_per_block)):
            for c in range(c0, c1):
                t1, t2 = _plane_grad_row(dy3, x3, o, c, mean[c])
                part[0, ob, c] += t1
                part[1, ob, c] += t2
    out = np.zeros((2, nch))
    for b in range(nob):  # block order: deterministic
        for c in range(nch):
            out[0, c] += part[0, b, c]
            out[1, c] += part[1, b, c]
    return out


@njit(parallel=True, cache=True)
def rows_input_grad(dy2, x2, a, mu, k, c1, rmask, out, rows_per_block):
    """`out = a·dy − m·(k·(x − mu) + c1)` per channel of (R, C) arrays, in x's dtype.

    The operation order matches the numpy reference, so the two round alike.

    Args:
        dy2, x2: (R, C) arrays; out: (R, C) output, all one dtype.
        a, mu, k, c1: (C,) arrays in that dtype.
        rmask: None (m = 1 everywhere) or bool (R,): m per row.
        rows_per_block: rows per parallel task.
    """
    nrow, nch = x2.shape
    gflat = dy2.reshape(dy2.size)
    flat = x2.reshape(x2.size)
    oflat = out.reshape(out.size)
    ahead = _PF_BYTES // x2.itemsize
    pf = _prefetch_pays(x2.itemsize * nch * 2)
    nrb = (nrow + rows_per_block - 1) // rows_per_block
    for it in prange(nrb):
        rb = nrb - 1 - it  # last block first: the end of dy and x may still be in cache
        for r in range(rb * rows_per_block, min(nrow, (rb + 1) * rows_per_block)):
            if pf:
                _prefetch_span(gflat, r * nch + ahead, (r + 1) * nch + ahead)
                _prefetch_span(flat, r * nch + ahead, (r + 1) * nch + ahead)
                _prefetch_w_span(oflat, r * nch + ahead, (r + 1) * nch + ahead)
            if rmask is not None:
                if not rmask[r]:
                    for c in range(nch):
                        out[r, c] = dy2[r, c] * a[c]
                    continue
            for c in range(nch):
                out[r, c] = dy2[r, c] * a[c] - ((x2[r, c] - mu[c]) * k[c] + c1[c])


@njit(parallel=True, cache=True)
def planes_input_grad(dy2, x2, a, mu, k, c1, pmask, out, nch, rows_per_block):
    """`out = a·dy − m·(k·(x − mu) + c1)` for (O*C, I) rows whose channel is `row % nch`.

    Args:
        dy2, x2: (O*C, I) arrays; out: (O*C, I) output, all one dtype.
        a, mu, k, c1: (C,) arrays in that dtype.
        pmask: None (m = 1) or bool (O*C,): m per row.
        nch: C.
        rows_per_block: rows per parallel task.
    """
    nrow, inner = x2.shape
    gflat = dy2.reshape(dy2.size)
    flat = x2.reshape(x2.size)
    oflat = out.reshape(out.size)
    ahead = _PF_BYTES // x2.itemsize
    pf = _prefetch_pays(x2.itemsize * inner * 2)
    nrb = (nrow + rows_per_block - 1) // rows_per_block
    for it in prange(nrb):
        rb = nrb - 1 - it  # last block first: the end of dy and x may still be in cache
        for r in range(rb * rows_per_block, min(nrow, (rb + 1) * rows_per_block)):
            if pf:
                _prefetch_span(gflat, r * inner + ahead, (r + 1) * inner + ahead)
                _prefetch_span(flat, r * inner + ahead, (r + 1) * inner + ahead)
                _prefetch_w_span(oflat, r * inner + ahead, (r + 1) * inner + ahead)
            c = r % nch
            ac = a[c]
            if pmask is not None:
                if not pmask[r]:
                    for i in range(inner):
                        out[r, i] = dy2[r, i] * ac
                    continue
            m = mu[c]
            kc = k[c]
            cc = c1[c]
            for i in range(inner):
                out[r, i] = dy2[r, i] * ac - ((x2[r, i] - m) * kc + cc)


# --- one replica's training forward in one call ----------------------------------------
# The layer's steps between the two passes, compiled: after a pass over a large input,
# each small numpy call runs on cold caches, and in Python they added measurably to the
# forward (docs/numerics.md, "Kernel design notes").


@njit(cache=True, error_model="numpy")
def _update_moving(moving_mean, moving_var, count, mean, m2, momentum):
    """`distbn.ops.batch_norm.update_moving` of var = m2 / max(count, 1), same rounding.

    Updates the moving arrays in place; returns the float64 (mean, var) to normalise
    with.
    """
    nch = count.shape[0]
    var = np.empty(nch)
    for c in range(nch):
        var[c] = m2[c] / max(count[c], 1.0)
    for c in range(nch):
        old_mean = np.float64(moving_mean[c])
        old_var = np.float64(moving_var[c])
        if count[c] > 0:
            if np.isfinite(mean[c]) and np.isfinite(var[c]):
                moving_mean[c] = old_mean * momentum + mean[c] * (1.0 - momentum)
                moving_var[c] = old_var * momentum + var[c] * (1.0 - momentum)
        else:  # no position: normalise with (and keep) the moving statistics
            mean[c] = old_mean
            var[c] = old_var
    return mean, var


@njit(cache=True)
def _tile(v, reps):
    """v repeated reps times (np.tile of a 1-D array)."""
    n = v.shape[0]
    out = np.empty(n * reps, dtype=v.dtype)
    for r in range(reps):
        for i in range(n):
            out[r * n + i] = v[i]
    return out


@njit(cache=True)
def rows_train_forward(x2, rows_per_block, gamma, beta, epsilon, use_gamma, use_beta,
                       moving_mean, moving_var, momentum, out, wide_rows_per_block):
    """`rows_moments`, `_update_moving` and `rows_normalize` (no mask) in one call.

    `out` is y's (R/reps, reps*C) view (the widened rows of `fused._Geometry`); the
    normalisation reads x2 through the same view, with the channel vectors tiled.

    Returns:
        (count, mean, var): float64 (C,); out holds y; the moving arrays are updated.
    """
    count, mean, m2 = rows_moments(x2, None, rows_per_block)
    mean, var = _update_moving(moving_mean, moving_var, count, mean, m2, momentum)
    rows_normalize_wide(x2, mean, var, gamma, beta, epsilon, use_gamma, use_beta, out,
                        wide_rows_per_block)
    return count, mean, var


@njit(cache=True, error_model="numpy")
def rows_normalize_wide(x2, mean, var, gamma, beta, epsilon, use_gamma, use_beta, out,
                        wide_rows_per_block):
    """`rows_normalize` of (R, C) rows into `out`, y's widened (R/reps, reps*C) view
    (`fused._Geometry.wide2`): x2 is read through the same view, the channel vectors
    tiled (the same arithmetic per element, so the same bits)."""
    reps = out.shape[1] // max(x2.shape[1], 1)
    if reps <= 1:
        rows_normalize(x2, mean, var, gamma, beta, epsilon, use_gamma, use_beta, out,
                       wide_rows_per_block)
    else:
        rows_normalize(x2.reshape(out.shape), _tile(mean, reps), _tile(var, reps),
                       _tile(gamma, reps) if use_gamma else gamma,
                       _tile(beta, reps) if use_beta else beta, epsilon, use_gamma,
                       use_beta, out, wide_rows_per_block)


@njit(inline="always", error_model="numpy")
def _input_grad_constants(sums, c, s0, s1, mu, inv_std, gamma, use_gamma, count, consts,
                          col):
    """Channel c's backward sums and input-gradient constants, by `backward_sums` and
    `input_grad`'s arithmetic: sums[:, c] = [Σdy, Σdy·x̂] from s0 = Σdy, s1 = Σdy·(x−mu);
    consts[:, col] = [a, mu, k, c1] cast once to consts' dtype (x's), as the reference."""
    s1 = s1 * inv_std
    sums[0, c] = s0
    sums[1, c] = s1
    _constants_of_sums(s0, s1, mu, inv_std, gamma[c] if use_gamma else 1.0, use_gamma,
                       count, consts, col)


@njit(inline="always", error_model="numpy")
def _constants_of_sums(s0, s1, mu, inv_std, gamma_c, use_gamma, count, consts, col):
    """consts[:, col] = [a, mu, k, c1] of one channel from its [Σdy, Σdy·x̂] = [s0, s1]
    (local or summed over the replicas), by `input_grad`'s arithmetic, cast once to
    consts' dtype (x's) as the reference does."""
    a = inv_std * gamma_c if use_gamma else inv_std
    coef = a / count if count > 0 else 0.0
    consts[0, col] = a
    consts[1, col] = mu
    consts[2, col] = coef * s1 * inv_std
    consts[3, col] = coef * s0


@njit(cache=True, error_model="numpy")
def rows_train_backward(dy2, x2, mean, inv_std, gamma, use_gamma, count, rows_per_block,
                        dxw, wide_rows_per_block):
    """`rows_grad_sums`, the input gradient's channel constants and `rows_input_grad` (no
    mask, one replica) in one call, with the separate steps' arithmetic (the same bits).

    The steps between the two passes are small per-channel numpy calls in Python; at
    the small inputs of a ResNet's later stages they cost as much as the passes.
    `dxw` is dx's widened (R/reps, reps*C) view (`fused._Geometry.wide2`); dy and x are
    read through the same view, the constants tiled.

    Returns:
        float64 (2, C): [Σdy, Σdy·x̂].
    """
    sums = rows_grad_sums(dy2, x2, mean, rows_per_block)
    nch = x2.shape[1]
    consts = np.empty((4, nch), dtype=x2.dtype)
    for c in range(nch):
        _input_grad_constants(sums, c, sums[0, c], sums[1, c], mean[c], inv_std[c], gamma,
                              use_gamma, count[c], consts, c)
    rows_input_grad_wide(dy2, x2, consts, dxw, wide_rows_per_block)
    return sums


@njit(cache=True)
def rows_input_grad_wide(dy2, x2, consts, dxw, wide_rows_per_block):
    """`rows_input_grad` (no mask) of (R, C) rows into dx's widened view `dxw`, from the
    (4, C) channel constants [a, mu, k, c1] in x's dtype (tiled for the wide rows)."""
    reps = dxw.shape[1] // max(x2.shape[1], 1)
    shape = dxw.shape
    rows_input_grad(dy2.reshape(shape), x2.reshape(shape), _tile(consts[0], reps),
                    _tile(consts[1], reps), _tile(consts[2], reps), _tile(consts[3], reps),
                    None, dxw, wide_rows_per_block)


@njit(cache=True)
def _channel_groups(nch, chan_per_block):
    """The channel groups `planes_moments` sums together: within each block of
    `chan_per_block` channels, fours from the start, then single channels.

    Returns:
        (starts, sizes): int64 arrays, one entry per group, in channel order.
    """
    starts = np.empty(nch, dtype=np.int64)
    sizes = np.empty(nch, dtype=np.int64)
    n = 0
    for c0 in range(0, nch, chan_per_block):
        c1 = min(nch, c0 + chan_per_block)
        rest = c0
        while rest + 4 <= c1:
            starts[n] = rest
            sizes[n] = 4
            n += 1
            rest += 4
        for c in range(rest, c1):
            starts[n] = c
            sizes[n] = 1
            n += 1
    return starts[:n], sizes[:n]


@njit(cache=True, error_model="numpy")
def _finish_planes(x3, out3, part, c, gamma, beta, epsilon, use_gamma, use_beta,
                   moving_mean, moving_var, momentum, count, mean, var):
    """Channels c..c+size of `planes_train_forward`: merge the block sums, update the
    moving statistics, normalise the channels' planes; the arithmetic of
    `_merge_moments`, `_update_moving` and `planes_normalize` (compiled apart from the
    reductions' reassociation, so the bits are theirs)."""
    size = part.shape[2]
    cnt = np.zeros(size)
    mu = np.zeros(size)
    m2 = np.zeros(size)
    _merge_moments(part, cnt, mu, m2)
    mu, v = _update_moving(moving_mean[c:c + size], moving_var[c:c + size], cnt, mu, m2,
                           momentum)
    scale, offset = _normalize_coefficients(mu, v, gamma[c:c + size], beta[c:c + size],
                                            epsilon, use_gamma, use_beta, x3.dtype)
    for j in range(size):
        count[c + j] = cnt[j]
        mean[c + j] = mu[j]
        var[c + j] = v[j]
        s = scale[j]
        f = offset[j]
        for o in range(x3.shape[0]):
            for i in range(x3.shape[2]):
                out3[o, c + j, i] = x3[o, c + j, i] * s + f


@njit(cache=True, fastmath=_REDUCE_MATH)
def _group_sums(x3, c, size, outer_per_block):
    """`planes_moments`' per-block [n, K, Σ(x−K), Σ(x−K)²] of channels c..c+size (size
    4 or 1), summed as there: shape (4, blocks, size)."""
    nout, _, inner = x3.shape
    nob = (nout + outer_per_block - 1) // outer_per_block
    part = np.zeros((4, nob, size))
    for ob in range(nob):
        o0 = ob * outer_per_block
        o1 = min(nout, o0 + outer_per_block)
        for j in range(size):
            part[1, ob, j] = x3[o0, c + j, 0]
        for o in range(o0, o1):
            if size == 4:
                a0, q0, a1, q1, a2, q2, a3, q3 = _plane_sums4(
                    x3, o, c, part[1, ob, 0], part[1, ob, 1], part[1, ob, 2],
                    part[1, ob, 3])
                _add_plane(part, ob, 0, inner, a0, q0)
                _add_plane(part, ob, 1, inner, a1, q1)
                _add_plane(part, ob, 2, inner, a2, q2)
                _add_plane(part, ob, 3, inner, a3, q3)
            else:
                t1, t2 = _plane_sums(x3, o, c, part[1, ob, 0])
                _add_plane(part, ob, 0, inner, t1, t2)
    return part


@njit(parallel=True, cache=True, error_model="numpy")
def planes_train_forward(x3, outer_per_block, chan_per_block, gamma, beta, epsilon,
                         use_gamma, use_beta, moving_mean, moving_var, momentum, out3):
    """`planes_moments`, `_update_moving` and `planes_normalize` (no mask), a few channels
    at a time, with the same bits.

    Each channel's statistics need only its own planes, so each group of channels that
    `planes_moments` sums together is summed, finished and normalised before the next:
    its planes (O x group x I elements: 1 MiB for the 16 MiB (64, 64, 32, 32) float32
    input) are still in the core's cache for the second read. x then comes from memory
    about once instead of twice, which brings the forward near a copy's time
    (docs/numerics.md, "Kernel design notes"). The sums are compiled apart
    (`_group_sums`, reassociated as in `planes_moments`), the rest without fast-math
    flags, as in `planes_normalize`.

    Returns:
        (count, mean, var): float64 (C,); out3 (x3's shape) holds y; the moving arrays
        are updated.
    """
    nch = x3.shape[1]
    starts, sizes = _channel_groups(nch, chan_per_block)
    count = np.empty(nch)
    mean = np.empty(nch)
    var = np.empty(nch)
    for g in prange(starts.shape[0]):
        c = starts[g]
        part = _group_sums(x3, c, sizes[g], outer_per_block)
        _finish_planes(x3, out3, part, c, gamma, beta, epsilon, use_gamma, use_beta,
                       moving_mean, moving_var, momentum, count, mean, var)
    return count, mean, var


# --- one replica's training backward, channels first ------------------------------------
@njit(cache=True, fastmath=_REDUCE_MATH)
def _plane_grad_part(dy3, x3, c, mu, outer_per_block):
    """`planes_grad_sums`' per-block [Σdy, Σdy·(x−mu)] of channel c: shape (2, blocks)."""
    nout = x3.shape[0]
    nob = (nout + outer_per_block - 1) // outer_per_block
    part = np.zeros((2, nob))
    for ob in range(nob):
        for o in range(ob * outer_per_block, min(nout, (ob + 1) * outer_per_block)):
            t1, t2 = _plane_grad_row(dy3, x3, o, c, mu)
            part[0, ob] += t1
            part[1, ob] += t2
    return part


@njit(cache=True, error_model="numpy")
def _finish_plane_backward(dy3, x3, part, c, mu, inv_std, gamma, use_gamma, count, sums,
                           dx3):
    """Channel c of `planes_train_backward`: the block sums in block order, then dx; the
    arithmetic of `backward_sums`, `input_grad` and `planes_input_grad`."""
    s0 = 0.0
    s1 = 0.0
    for b in range(part.shape[1]):  # block order, as planes_grad_sums
        s0 += part[0, b]
        s1 += part[1, b]
    consts = np.empty((4, 1), dtype=x3.dtype)
    _input_grad_constants(sums, c, s0, s1, mu, inv_std, gamma, use_gamma, count, consts, 0)
    at, mt, kt, ct = consts[0, 0], consts[1, 0], consts[2, 0], consts[3, 0]
    for o in range(x3.shape[0]):
        for i in range(x3.shape[2]):
            dx3[o, c, i] = dy3[o, c, i] * at - ((x3[o, c, i] - mt) * kt + ct)


@njit(parallel=True, cache=True, error_model="numpy")
def planes_train_backward(dy3, x3, mean, inv_std, gamma, use_gamma, count, outer_per_block,
                          dx3):
    """`planes_grad_sums` and `planes_input_grad` (no mask, one replica), channel by
    channel, with the same bits.

    A channel's input gradient needs only its own sums, so each channel's dy and x
    planes (O x I elements each: 256 KiB for the 16 MiB (64, 64, 32, 32) float32 input)
    are summed and then read again for dx while still in the core's cache: dy and x
    come from memory about once instead of twice.

    Args:
        dy3, x3: (O, C, I) arrays of one dtype; dx3: the (O, C, I) output.
        mean, inv_std, count: float64 (C,); gamma: float64 (C,), read if use_gamma.
        outer_per_block: planes_grad_sums' block length.

    Returns:
        float64 (2, C): [Σdy, Σdy·x̂].
    """
    nch = x3.shape[1]
    sums = np.empty((2, nch))
    for c in prange(nch):
        part = _plane_grad_part(dy3, x3, c, mean[c], outer_per_block)
        _finish_plane_backward(dy3, x3, part, c, mean[c], inv_std[c], gamma, use_gamma,
                               count[c], sums, dx3)
    return sums
