"""The autograd Function of distbn's PyTorch BatchNorm: where the collectives live.

Tensors are seen as zero-copy numpy views and handed to `distbn.ops`, with the
strategy's `sync_all_reduce` as the all-reduce of a sync group (one call forward, one
backward; none with one replica). The running statistics follow PyTorch:
`running = (1 - m) * running + m * stat` with the unbiased variance of the global batch.

Two paths, the same results. The prepared one (numba's kernels, a fused view of x,
parameters and buffers of x's dtype: the usual case) makes each half step one compiled
call through a `distbn.ops.step.TrainStep` cached per input signature, two around a
collective; at a ResNet's small inputs the Python steps between kernels, each several
microseconds after a convolution's memory traffic, cost as much as the kernels. The
general one (the numpy backend, float16 buffers, eval with running statistics, an empty
shard) calls `kernels().train_forward/train_backward` or
`ops.synchronized_train_forward/synchronized_backward`.

Layouts: a contiguous (N, C, ...) tensor is viewed as is (channels first); a tensor
whose (N, ..., C) permutation is contiguous (channels_last, channels_last_3d, or a
transposed (N, L, C) sequence) is viewed through that permutation, channels last. No
layout copy of the input is made; anything else is made contiguous first.
"""

from __future__ import annotations

import numpy as np

from distbn import ops as _ops
from distbn.torch._import import require_torch

torch = require_torch()

__all__ = ["SyncBatchNormFunction", "SyncGroup", "sync_batch_norm"]

_F64 = np.float64
_NATIVE = (torch.float32, torch.float64)  # computed as they are; others in float32


# The channels-last order of each input rank, (N, ..., C), and its inverse.
_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
_INVERSE = {p: tuple(int(i) for i in np.argsort(p)) for p in _LAST.values()}


def _numpy_view(t):
    """A tensor's memory as a numpy array (no copy; numpy keeps torch's strides), or None."""
    if t is None:
        return None
    return t.detach().numpy() if t.requires_grad else t.numpy()


def _layout(t):
    """`(array, perm)`: `t`'s memory as a C-contiguous numpy array in the order `perm`
    (None: the tensor's own order); no copy, unless no such order exists.

    The permutation is numpy's: a torch `permute` of a tensor that requires grad costs
    several microseconds more (a view tracked by autograd), at every layer and step.
    """
    a = _numpy_view(t)
    if a.flags.c_contiguous:
        return a, None
    perm = _LAST.get(a.ndim)
    if perm is not None:
        view = a.transpose(perm)
        if view.flags.c_contiguous:
            return view, perm
    return np.ascontiguousarray(a), None


def _as_layout(t, perm):
    """`t` (x's shape) as a C-contiguous numpy array in the order `perm`; a copy only if
    needed."""
    a = _numpy_view(t)
    if perm is not None:
        a = a.transpose(perm)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _from_layout(a, perm):
    """A numpy array in the order `perm` back as a tensor of the logical (N, C, ...) shape.

    The permutation is numpy's (strides only): the tensor owns the memory rather than
    being a torch view, so in-place ops on the output (ReLU(inplace=True)) are allowed.
    """
    if perm is not None:
        a = a.transpose(_INVERSE[perm])
    return torch.from_numpy(a)


def _reduce_axes(ndim, perm):
    """Every axis of the numpy view but the channel axis (1, or last in the permuted view)."""
    return tuple(range(ndim - 1)) if perm is not None else (0, *range(2, ndim))


def _channel_f64(t):
    """A per-channel tensor (parameter or buffer) as a float64 numpy array (a copy)."""
    if t is None:
        return None
    if t.dtype in _NATIVE:  # numpy's conversion: a few times cheaper than torch's .to
        return np.array(t.detach().numpy(), dtype=_F64)
    return t.detach().to(torch.float64).numpy()


def _assign(buffer, value):
    """Write a float64 numpy array into a per-channel tensor (rounded to its dtype)."""
    if buffer.dtype in _NATIVE:
        buffer.detach().numpy()[...] = value
    else:
        buffer.copy_(torch.from_numpy(value))


def _grad_tensor(sums_row, dtype):
    """A float64 row of the backward sums as a gradient tensor of `dtype`."""
    if dtype == torch.float64:
        return torch.from_numpy(np.ascontiguousarray(sums_row))
    if dtype == torch.float32:
        return torch.from_numpy(sums_row.astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(sums_row)).to(dtype)


def _check_values_per_channel(count, x, group_size):
    if count == 1:
        where = "" if group_size == 1 else (
            f" (1 value per channel over the {group_size} replicas of the sync group)")
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {x.shape}{where}")


def _restore_threads(threads):
    """Put back torch's intra-op thread count if the kernels changed it.

    numba's OpenMP threading layer shares libgomp with torch and sets its thread count
    to numba's pool size when the pool starts; torch's convolutions would then run
    with every core on each rank (measured: 30x slower ResNet steps at 2 ranks on 2 cores).
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class SyncGroup:
    """A module's sync-group all-reduces: a strategy, a label, the group's size."""

    __slots__ = ("strategy", "name", "size")

    def __init__(self, strategy, name):
        self.strategy, self.name = strategy, name
        self.size = strategy.sync_group_size

    def forward(self, buf):
        return self.strategy.sync_all_reduce(buf, name=f"{self.name}/forward")

    def backward(self, buf):
        return self.strategy.sync_all_reduce(buf, name=f"{self.name}/backward")


def _update_running(running_mean, running_var, count, mean, var, momentum):
    """PyTorch's running-statistics update (`distbn.ops.batch_norm.update_running`:
    unbiased variance of the global batch, untouched by an empty one), in the buffers.

    float32/float64 buffers are updated in place through numpy views; others through a
    float64 copy written back (rounded to their dtype).
    """
    views = [None if b is None else b.detach().numpy() if b.dtype in _NATIVE
             else _channel_f64(b) for b in (running_mean, running_var)]
    _ops.kernels().update_running(views[0], views[1], count, mean, var, momentum)
    for buffer, view in zip((running_mean, running_var), views, strict=True):
        if buffer is not None and buffer.dtype not in _NATIVE:
            _assign(buffer, view)


class SyncBatchNormFunction(torch.autograd.Function):
    """y = BN(x) over the sync group; backward through the global batch statistics.

    `apply(x, weight, bias, running_mean, running_var, batch_stats, factor, eps, group)`:
    `sync_batch_norm`'s arguments after its checks (`factor` PyTorch's exponential
    average factor or None, `group` a `SyncGroup` or None for local statistics); the
    module calls it directly.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, batch_stats, momentum,
                eps, group):
        threads = torch.get_num_threads()
        in_dtype = x.dtype
        work = x if in_dtype in _NATIVE else x.to(torch.float32)
        xn, perm = _layout(work)
        step = None
        if batch_stats:
            step = _fast_step(xn, perm, work.dtype, weight, bias, running_mean, running_var,
                              momentum)
        if step is not None:
            y, mean, inv_std, count = _fast_forward(step, xn, perm, x, weight, bias,
                                                    running_mean, running_var, momentum,
                                                    eps, group)
            red = gamma = None
        else:
            y, mean, inv_std, count, red, gamma = _forward(
                xn, perm, x, weight, bias, running_mean, running_var, batch_stats, momentum,
                eps, group)
        _restore_threads(threads)
        ctx.save_for_backward(work, weight)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.meta = (perm, red, mean, inv_std, gamma, count, group, in_dtype, step, xn)
        out = _from_layout(y, perm)
        return out if in_dtype in _NATIVE else out.to(in_dtype)

    @staticmethod
    def backward(ctx, dy):
        threads = torch.get_num_threads()
        work, weight = ctx.saved_tensors  # checks that neither changed in place since
        perm, red, mean, inv_std, gamma, count, group, in_dtype, step, xn = ctx.meta
        dyn = _as_layout(dy if dy.dtype == work.dtype else dy.to(work.dtype), perm)
        need_dx, need_w, need_b = ctx.needs_input_grad[:3]
        if step is not None:
            gn = _numpy_view(weight)
            sums, dx = _fast_backward(step, dyn, xn, mean, inv_std, gn, count, group,
                                      need_dx, need_w or need_b)
        else:
            sums, dx = _backward(dyn, xn, red, mean, inv_std, gamma, count, group, need_dx,
                                 need_w or need_b)
        _restore_threads(threads)
        grad_x = grad_w = grad_b = None
        if need_dx:
            grad_x = _from_layout(dx, perm)
            if in_dtype not in _NATIVE:
                grad_x = grad_x.to(in_dtype)
        # weight/bias gradients: this replica's local sums (DDP or the trainer sums them).
        if need_w:
            grad_w = _grad_tensor(sums[1], ctx.weight_dtype)
        if need_b:
            grad_b = _grad_tensor(sums[0], ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


# --- the prepared path: one compiled call per half (distbn.ops.step) ---------------------
_STEPS: dict = {}  # (shape, layout, dtype) -> distbn.ops.step.TrainStep, or None
_MAX_STEPS = 512


def _fast_step(xn, perm, dtype, weight, bias, running_mean, running_var, momentum):
    """The prepared `TrainStep` for this batch-statistics call, or None (the general
    path): numba's kernels, a fused view of x, and channel tensors of x's dtype (kept as
    they are: numpy views, read and updated in place)."""
    if _ops.backend_name() != "numba":
        return None
    for t in (weight, bias, running_mean, running_var):
        if t is not None and t.dtype != dtype:
            return None
    if momentum is not None and (running_mean is None) != (running_var is None):
        return None
    key = (xn.shape, perm, xn.dtype.char)
    try:
        return _STEPS[key]
    except KeyError:
        pass
    from distbn.ops.step import train_step

    if len(_STEPS) >= _MAX_STEPS:
        _STEPS.clear()
    _STEPS[key] = step = train_step(xn, _reduce_axes(xn.ndim, perm))
    return step


def _fast_forward(step, xn, perm, x, weight, bias, running_mean, running_var, momentum,
                  eps, group):
    """(y, mean, inv_std, count) of a batch-statistics forward through `step`."""
    gamma, beta = _numpy_view(weight), _numpy_view(bias)
    rm = rv = None
    factor = 0.0
    if momentum is not None and running_mean is not None:
        rm, rv, factor = running_mean.numpy(), running_var.numpy(), float(momentum)
    if group is None:
        _check_values_per_channel(xn.size // max(x.shape[1], 1), x, 1)
        y, count, mean, _, inv_std = step.forward(xn, gamma, beta, eps, rm, rv, factor)
        return y, mean, inv_std, count
    # The shift must be the same on every replica: the running mean is (the buffers are
    # broadcast by DDP), zeros without one.
    shift = (np.zeros(x.shape[1]) if running_mean is None
             else np.array(running_mean.numpy(), dtype=_F64))
    packed, local_count, local_mean, m2 = step.local_sums(xn, shift)
    summed = group.forward(packed)
    _check_values_per_channel(int(summed[2, 0]), x, group.size)
    y, mean, var, count, inv_std = step.finish_forward(xn, summed, shift, gamma, beta, eps,
                                                       rm, rv, factor)
    if y is None:  # ill-conditioned: the corrective pass, then the general steps
        kern = _ops.kernels()
        var = _ops.centred_var(local_count, local_mean, m2, mean, count, group.forward)
        y = kern.normalize(xn, mean, var, gamma, beta, eps, _reduce_axes(xn.ndim, perm))
        if rm is not None:
            kern.update_running(rm, rv, count, mean, var, factor)
        inv_std = _ops.inverse_std(var, eps)
    return y, mean, inv_std, count


def _fast_backward(step, dyn, xn, mean, inv_std, gamma, count, group, need_dx, need_sums):
    """(local sums, dx) of a batch-statistics backward through `step`."""
    if group is None:
        if need_dx:
            return step.backward(dyn, xn, mean, inv_std, gamma, count)
        return (step.grad_sums(dyn, xn, mean, inv_std) if need_sums else None), None
    # every replica joins the collective, whatever it needs
    local = step.grad_sums(dyn, xn, mean, inv_std)
    summed = group.backward(local.copy())
    return local, step.input_grad(dyn, xn, summed, mean, inv_std, gamma, count)


# --- the general path: distbn.ops' functions ---------------------------------------------
def _forward(xn, perm, x, weight, bias, running_mean, running_var, batch_stats, momentum,
             eps, group):
    """(y, mean, inv_std, count, reduce axes, float64 gamma) through `distbn.ops`."""
    red = _reduce_axes(xn.ndim, perm)
    gamma, beta = _channel_f64(weight), _channel_f64(bias)
    kern = _ops.kernels()
    if not batch_stats:  # running statistics: constants, no communication
        mean, var, count = _channel_f64(running_mean), _channel_f64(running_var), None
        y = kern.normalize(xn, mean, var, gamma, beta, eps, red)
    elif group is None:
        _check_values_per_channel(xn.size // max(x.shape[1], 1), x, 1)
        # The fused one-call forward; its Keras-style moving update goes to scratch
        # arrays (PyTorch's rule differs; they only stand in for an empty batch,
        # whose output is empty).
        y, count, mean, var = kern.train_forward(xn, red, None, gamma, beta, eps,
                                                 np.zeros(x.shape[1]),
                                                 np.ones(x.shape[1]), 1.0)
    else:
        # The shift must be the same on every replica: the running mean is (the
        # buffers are broadcast by DDP), zeros without one.
        shift = (np.zeros(x.shape[1]) if running_mean is None
                 else _channel_f64(running_mean))
        y, mean, var, count = _ops.synchronized_train_forward(xn, red, shift, gamma, beta,
                                                              eps, group.forward)
        _check_values_per_channel(int(count.flat[0]), x, group.size)
        if count.flat[0] == 0:  # no value anywhere: the output is empty everywhere
            var = np.ones_like(var)
    if batch_stats and momentum is not None:
        _update_running(running_mean, running_var, count, mean, var, float(momentum))
    return y, mean, _ops.inverse_std(var, eps), count, red, gamma


def _backward(dyn, xn, red, mean, inv_std, gamma, count, group, need_dx, need_sums):
    """(local sums, dx) through `distbn.ops`."""
    kern = _ops.kernels()
    sums = dx = None
    if count is None:  # running statistics: the affine map
        if need_sums:
            sums = kern.backward_sums(dyn, xn, mean, inv_std, red)
        if need_dx:
            dx = kern.input_grad(dyn, xn, mean, inv_std, gamma, None, None, None, red)
    elif group is None:
        if need_dx:
            sums, dx = kern.train_backward(dyn, xn, mean, inv_std, gamma, count, red)
        elif need_sums:
            sums = kern.backward_sums(dyn, xn, mean, inv_std, red)
    else:  # every replica joins the collective, whatever it needs
        sums, dx = _ops.synchronized_backward(dyn, xn, mean, inv_std, gamma, count, red,
                                              None, group.backward)
    return sums, dx


def sync_batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, strategy=None, name="sync_batch_norm"):
    """`torch.nn.functional.batch_norm` with batch statistics over a strategy's sync group.

    Args:
        x: CPU tensor (N, C, ...), 2-D to 5-D, any float dtype (float16/bfloat16 are
            computed in float32 and returned in their dtype).
        running_mean, running_var: (C,) buffers or None; updated in place in training
            (PyTorch's rule, unbiased variance of the global batch).
        weight, bias: (C,) tensors or None.
        training: use (and synchronize) batch statistics; else the running ones.
        momentum: PyTorch's exponential average factor, or None for no running update.
        eps: added to the variance.
        strategy: a `distbn` strategy whose sync group shares the statistics; None or a
            group of one replica: local statistics, no communication.
        name: the label of its collectives (check mode, stall reports).

    Returns:
        The normalised tensor, x's shape, dtype and memory format.
    """
    group = None
    if training and strategy is not None and strategy.sync_group_size > 1:
        group = SyncGroup(strategy, name)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("sync_batch_norm: training=False needs running_mean and "
                         f"running_var, got {type(running_mean).__name__} and "
                         f"{type(running_var).__name__}")
    y = SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var,
                                     bool(training), momentum, float(eps), group)
    return y
