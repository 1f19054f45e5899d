"""The bridge from Keras backend tensors to distbn's host collectives.

Every collective the Keras adapter makes goes through here, on host numpy buffers, via
the strategy (`sync_all_reduce` for batch statistics, `all_reduce` for gradients,
`broadcast` for variables), so sync groups, check mode, the stall watchdog and the abort
hook apply unchanged. JAX reaches the host through XLA FFI calls (`_xla_ffi`, compiled
collectives counted by the strategy; ordered `io_callback`s in check mode) that
carry only per-channel buffers: the local (count, mean, M2) is computed in XLA; PyTorch
eagerly, from an autograd Function, on the tensor's own memory.

The statistics' backward: with global moments mean = ΣMx/N and var = ΣM(x-mean)²/N,
every rank's loss depends on them, so d(Σ_ranks L)/dx_i needs the cotangents summed
over the ranks: dx_i = M_i (Dmean + 2 Dvar (x_i - mean)) / N with Dmean = Σ_r dmean_r,
Dvar = Σ_r dvar_r: one collective of 2C floats. The direct path x -> y is left to the
backend's autodiff.
"""

from __future__ import annotations

import numpy as np

from distbn.distribute.native import native_available
from distbn.ops import kernels, pooled_moments

__all__ = [
    "host_moments",
    "host_pooled_moments",
    "host_sum_cotangents",
    "moments",
    "mean_gradients",
    "backend_name",
]

DEFAULT_BUCKET_BYTES = 4 << 20  # gradient bucket, as distbn's own trainer


def backend_name() -> str:
    import keras

    return keras.backend.backend()


# -- host side: numpy in, numpy out -------------------------------------------------


def host_moments(x, mask, shift, moving_var, reduce_axes, epsilon, strategy, name):
    """Global (mean, var, count) of this replica's numpy shard, float64, one collective."""
    count, local_mean, m2 = kernels().local_mean_m2(np.asarray(x), tuple(reduce_axes),
                                                    None if mask is None
                                                    else np.asarray(mask).astype(bool))
    return host_pooled_moments(count, local_mean, m2, shift, moving_var, epsilon,
                               strategy, name)


def host_pooled_moments(count, local_mean, m2, shift, moving_var, epsilon, strategy, name):
    """Global (mean, var, count) from this replica's local (count, mean, M2), float64.

    Only these 3C numbers cross to the host (the JAX path computes them in XLA): the
    packed [S1, S2, n] makes the one collective (`distbn.ops.pooled_moments`, the
    synchronized layer's own pooling). Where the global batch has no
    position (N = 0) the moving statistics come back, so Keras' moving-average update
    keeps them and the layer normalises with them.
    """
    count = np.asarray(count, dtype=np.float64)
    local_mean = np.asarray(local_mean, dtype=np.float64)
    m2 = np.asarray(m2, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    mean, var, total = pooled_moments(
        count, local_mean, m2, shift, epsilon,
        lambda buf: strategy.sync_all_reduce(buf, name=name))
    empty = total == 0
    if np.any(empty):
        mean = np.where(empty, shift, mean)
        var = np.where(empty, np.asarray(moving_var, dtype=np.float64), var)
    return mean, var, total


def host_sum_cotangents(dmean, dvar, strategy, name):
    """[Σ_r dmean_r, Σ_r dvar_r] over the sync group (float64, one collective)."""
    buf = np.empty((2,) + np.shape(dmean), dtype=np.float64)
    buf[0] = dmean
    buf[1] = dvar
    return strategy.sync_all_reduce(buf, name=name)


def _host_all_reduce(buf, strategy, name):
    buf = np.ascontiguousarray(buf).copy()  # callback inputs may be read-only views
    return strategy.all_reduce(buf, name=name)


# -- the moments op -------------------------------------------------------------------


def moments(x, mask, shift, moving_var, reduce_axes, epsilon, strategy, name):
    """Synchronized (mean, var) of a backend tensor, differentiable w.r.t. `x`.

    Args:
        x: the layer input (float32/float64 backend tensor), this replica's shard.
        mask: None, or a boolean tensor of x's rank broadcasting to x (True = counted).
        shift: the moving mean (identical on every replica): the sums' shift K.
        moving_var: the moving variance, returned where the global batch is empty.
        reduce_axes: the non-channel axes.
        epsilon: the layer's epsilon.
        strategy: the distbn strategy whose sync group pools the statistics.
        name: the layer name (check mode, errors).

    Returns:
        (mean, var) with the channel shape, in x's dtype.
    """
    spec = (tuple(reduce_axes), float(epsilon), strategy, name)
    kind = backend_name()
    if kind == "jax":
        return _jax_moments(x, mask, shift, moving_var, spec)
    if kind == "torch":
        return _TORCH.moments(x, mask, shift, moving_var, spec)
    raise ValueError(
        "distbn.keras.layers.BatchNormalization(synchronized=True) supports the JAX and "
        f"PyTorch backends; received the {kind!r} backend (on TensorFlow use "
        "keras.layers.BatchNormalization(synchronized=True) with a tf.distribute "
        "strategy)"
    )


def _channel_shape(shape, reduce_axes):
    return tuple(d for a, d in enumerate(shape) if a not in reduce_axes)


def _full_shape(v, reduce_axes):
    """x's rank with v's channel sizes in place and 1 on the reduce axes."""
    dims = iter(v.shape)
    ndim = len(v.shape) + len(reduce_axes)
    return tuple(1 if a in reduce_axes else next(dims) for a in range(ndim))


# -- JAX ----------------------------------------------------------------------------

_JAX_MOMENTS = []  # the custom_vjp function, made on first use


def _jax_moments(x, mask, shift, moving_var, spec):
    if not _JAX_MOMENTS:
        _JAX_MOMENTS.append(_make_jax_moments())
    import jax.numpy as jnp

    if mask is None:
        mask_arr = jnp.ones((0,), dtype=jnp.bool_)  # placeholder: "no mask"
        has_mask = False
    else:
        mask_arr = jnp.asarray(mask, dtype=jnp.bool_)
        has_mask = True
    return _JAX_MOMENTS[0](x, mask_arr, shift, moving_var, spec + (has_mask,))


def _jax_local_moments(x, mask, reduce_axes):
    """This shard's [count, mean, M2] per channel, stacked (3, C), in x's dtype (XLA).

    Two passes (mean, then squared deviations from it), as the host kernels: the shifted
    sums the host forms from them stay accurate. An empty shard gives zeros.
    """
    import jax
    import jax.numpy as jnp

    x = jax.lax.stop_gradient(x)
    cshape = _channel_shape(x.shape, reduce_axes)
    full = tuple(1 if a in reduce_axes else d for a, d in enumerate(x.shape))
    if mask is None:
        n = int(np.prod([x.shape[a] for a in reduce_axes]))
        if n == 0:
            return jnp.zeros((3,) + cshape, x.dtype)
        count = jnp.full(cshape, n, x.dtype)
        mean = jnp.mean(x, axis=reduce_axes)
        m2 = jnp.sum(jnp.square(x - jnp.reshape(mean, full)), axis=reduce_axes)
    else:
        m = jnp.broadcast_to(mask, x.shape)
        zero = jnp.zeros((), x.dtype)
        count = jnp.sum(m.astype(x.dtype), axis=reduce_axes)
        mean = jnp.sum(jnp.where(m, x, zero), axis=reduce_axes) / jnp.maximum(count, 1.0)
        dev = jnp.where(m, x - jnp.reshape(mean, full), zero)
        m2 = jnp.sum(jnp.square(dev), axis=reduce_axes)
    return jnp.stack([count, mean, m2])


def _make_jax_moments():
    import functools

    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    def forward(x, mask, shift, moving_var, spec):
        reduce_axes, epsilon, strategy, name, has_mask = spec
        cshape = _channel_shape(x.shape, reduce_axes)
        out = jax.ShapeDtypeStruct(cshape, x.dtype)
        # The local moments are XLA's work; only their (3, C) buffer crosses to the host
        # (a whole activation per layer and step did, and was the synchronized step's
        # main cost).
        local = _jax_local_moments(x, mask if has_mask else None, reduce_axes)
        if _native(strategy):
            return _xla_ffi_call("distbn_bn_moments", (out, out, out), strategy, name,
                                 epsilon, local, jax.lax.stop_gradient(shift),
                                 jax.lax.stop_gradient(moving_var))

        def host(lh, kh, vh):
            mean, var, count = host_pooled_moments(lh[0], lh[1], lh[2], kh, vh, epsilon,
                                                   strategy, name)
            dt = lh.dtype
            return mean.astype(dt), var.astype(dt), count.astype(dt)

        return io_callback(host, (out, out, out), local, jax.lax.stop_gradient(shift),
                           jax.lax.stop_gradient(moving_var), ordered=True)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def sync_moments(x, mask, shift, moving_var, spec):
        mean, var, _ = forward(x, mask, shift, moving_var, spec)
        return mean, var

    def fwd(x, mask, shift, moving_var, spec):
        mean, var, count = forward(x, mask, shift, moving_var, spec)
        return (mean, var), (x, mask, mean, count)

    def bwd(spec, res, cotangents):
        reduce_axes, _, strategy, name, has_mask = spec
        x, mask, mean, count = res
        dmean, dvar = cotangents
        out = jax.ShapeDtypeStruct((2,) + mean.shape, x.dtype)

        def host(dm, dv):
            return host_sum_cotangents(dm, dv, strategy, name).astype(dm.dtype)

        if _native(strategy):
            tot = _xla_ffi_call("distbn_bn_cotangents", out, strategy, name, 0.0, dmean,
                                dvar)
        else:
            tot = io_callback(host, out, dmean, dvar, ordered=True)
        shape = _full_shape(mean, reduce_axes)
        inv_n = 1.0 / jnp.maximum(count, 1.0)
        a = jnp.reshape(tot[0] * inv_n, shape)
        b = jnp.reshape(2.0 * tot[1] * inv_n, shape)
        dx = a + b * (x - jnp.reshape(mean, shape))
        if has_mask:
            dx = jnp.where(mask, dx, jnp.zeros((), dx.dtype))
        return dx.astype(x.dtype), None, None, None

    sync_moments.defvjp(fwd, bwd)
    return sync_moments


def _native(strategy) -> bool:
    from distbn.keras import _xla_ffi

    return native_available(strategy) and _xla_ffi.abi_supported()


def _xla_ffi_call(target, out, strategy, name, epsilon, *args):
    """`target` of distbn.keras._xla_ffi on args: the host work without a Python callback."""
    import jax
    import jax.numpy as jnp

    from distbn.keras import _xla_ffi

    _xla_ffi.register()
    desc = jnp.asarray(_xla_ffi.descriptor(strategy, name, epsilon))
    return jax.ffi.ffi_call(target, out, has_side_effect=True)(desc, *args)


# -- PyTorch ------------------------------------------------------------------------


class _LazyTorch:
    """Builds the autograd Function on first use, so importing this needs no torch."""

    _fn = None

    def moments(self, x, mask, shift, moving_var, spec):
        if self._fn is None:
            type(self)._fn = _make_torch_function()
        return self._fn.apply(x, mask, shift, moving_var, spec)


_TORCH = _LazyTorch()


def _make_torch_function():
    import torch

    class SyncMoments(torch.autograd.Function):
        """Global moments forward (one collective); [Σdmean, Σdvar] backward (one)."""

        @staticmethod
        def forward(ctx, x, mask, shift, moving_var, spec):
            reduce_axes, epsilon, strategy, name = spec
            xh = x.detach().cpu().numpy()
            mh = None if mask is None else mask.detach().cpu().numpy()
            mean, var, count = host_moments(xh, mh, shift.detach().cpu().numpy(),
                                            moving_var.detach().cpu().numpy(),
                                            reduce_axes, epsilon, strategy, name)
            mean_t = torch.from_numpy(mean).to(device=x.device, dtype=x.dtype)
            var_t = torch.from_numpy(var).to(device=x.device, dtype=x.dtype)
            count_t = torch.from_numpy(count).to(device=x.device, dtype=x.dtype)
            ctx.spec = spec
            ctx.has_mask = mask is not None
            ctx.save_for_backward(x, mean_t, count_t, *(() if mask is None else (mask,)))
            return mean_t, var_t

        @staticmethod
        def backward(ctx, dmean, dvar):
            reduce_axes, _, strategy, name = ctx.spec
            x, mean, count, *rest = ctx.saved_tensors
            tot = host_sum_cotangents(dmean.detach().cpu().numpy(),
                                      dvar.detach().cpu().numpy(), strategy, name)
            tot = torch.from_numpy(tot).to(device=x.device, dtype=x.dtype)
            shape = _full_shape(mean, reduce_axes)
            inv_n = 1.0 / torch.clamp(count, min=1.0)
            a = (tot[0] * inv_n).reshape(shape)
            b = (2.0 * tot[1] * inv_n).reshape(shape)
            dx = a + b * (x - mean.reshape(shape))
            if ctx.has_mask:
                dx = torch.where(rest[0], dx, torch.zeros((), dtype=dx.dtype))
            return dx, None, None, None, None

    return SyncMoments


# -- gradients ------------------------------------------------------------------------


def _buckets(sizes_bytes, dtypes, bucket_bytes):
    """Indices grouped by dtype into consecutive buckets of at most `bucket_bytes`."""
    by_dtype = {}
    for i, dt in enumerate(dtypes):
        by_dtype.setdefault(dt, []).append(i)
    buckets = []
    for dt in sorted(by_dtype, key=str):
        current, size = [], 0
        for i in by_dtype[dt]:
            if current and size + sizes_bytes[i] > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += sizes_bytes[i]
        if current:
            buckets.append(current)
    return buckets


def mean_gradients(grads, strategy, bucket_bytes=DEFAULT_BUCKET_BYTES, name="gradients"):
    """Gradients summed over every replica, then divided by their number.

    Packed per dtype into flat buckets of at most `bucket_bytes`, one `all_reduce` per
    bucket. `None` entries pass through. One replica: the list unchanged.
    """
    grads = list(grads)
    n = strategy.num_replicas_in_sync
    if n == 1:
        return grads
    live = [i for i, g in enumerate(grads) if g is not None]
    kind = backend_name()
    dtypes = [str(grads[i].dtype) for i in live]
    sizes = [int(np.prod(grads[i].shape)) * np.dtype(_np_dtype(dtypes[k])).itemsize
             for k, i in enumerate(live)]
    out = list(grads)
    for b, bucket in enumerate(_buckets(sizes, dtypes, bucket_bytes)):
        idx = [live[k] for k in bucket]
        label = f"{name}/{b}"
        if kind == "jax":
            reduced = _jax_mean(grads, idx, n, strategy, label)
        elif kind == "torch":
            reduced = _torch_mean(grads, idx, n, strategy, label)
        else:
            reduced = _numpy_mean(grads, idx, n, strategy, label)
        for i, g in zip(idx, reduced, strict=True):
            out[i] = g
    return out


def _np_dtype(name):
    return np.dtype(name.replace("torch.", ""))


def _jax_mean(grads, idx, n, strategy, label):
    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    flat = jnp.concatenate([jnp.ravel(grads[i]) for i in idx])

    def host(buf):
        return _host_all_reduce(buf, strategy, label)

    flat = io_callback(host, jax.ShapeDtypeStruct(flat.shape, flat.dtype), flat,
                       ordered=True) / n
    return _split(flat, [grads[i].shape for i in idx], jnp.reshape)


def _torch_mean(grads, idx, n, strategy, label):
    import torch

    flat = torch.cat([grads[i].detach().reshape(-1) for i in idx]).cpu().contiguous()
    strategy.all_reduce(flat.numpy(), name=label)  # the numpy view shares the memory
    flat = (flat / n).to(grads[idx[0]].device)
    return _split(flat, [tuple(grads[i].shape) for i in idx], torch.reshape)


def _numpy_mean(grads, idx, n, strategy, label):
    flat = np.concatenate([np.ravel(np.asarray(grads[i])) for i in idx])
    flat = _host_all_reduce(flat, strategy, label) / n
    return _split(flat, [np.shape(grads[i]) for i in idx], np.reshape)


def _split(flat, shapes, reshape):
    parts, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        parts.append(reshape(flat[start:start + size], tuple(shape)))
        start += size
    return parts


def broadcast_arrays(arrays, strategy, root=0, name="variables"):
    """Root's numpy arrays on every replica: one `broadcast` per dtype (packed)."""
    if strategy.num_replicas_in_sync == 1:
        return [np.asarray(a) for a in arrays]
    arrays = [np.asarray(a) for a in arrays]
    out = list(arrays)
    by_dtype = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype.str, []).append(i)
    for key in sorted(by_dtype):
        idx = by_dtype[key]
        flat = np.concatenate([arrays[i].ravel() for i in idx])
        if flat.dtype == np.bool_:
            flat = flat.astype(np.uint8)
        strategy.broadcast(flat, root=root, name=f"{name}/{key}")
        parts = _split(flat, [arrays[i].shape for i in idx], np.reshape)
        for i, part in zip(idx, parts, strict=True):
            out[i] = part.astype(arrays[i].dtype, copy=False)
    return out
