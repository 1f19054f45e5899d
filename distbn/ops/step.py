"""A training step's compiled calls for one input signature, prepared once (numba).

`distbn.ops.fused`'s functions work out the view, the blocks and the kernel at every
call: a dozen Python steps each. A framework adapter calls BatchNorm per layer and
step at a network's small inputs, after convolutions that leave the caches cold, and
there each Python step costs several microseconds (the PyTorch adapter's forward spent
~120 us per layer outside its kernels in the example ResNet, measured 2026-12-02,
docs/torch.md). `TrainStep` does that work once per shape, dtype and layout; each method
is one kernel call with the arithmetic of the `fused` functions it stands for (the same
bits), and with PyTorch's running statistics (`batch_norm.update_running`) where it
keeps any.

Arrays are C-contiguous in the input's own layout (x, dy, and the outputs alike);
channel arrays (gamma, beta, running statistics) are (C,) arrays of x's dtype, or None.
Importing this module imports numba; `train_step` answers None where the fused
kernels do not apply, and callers use the `distbn.ops` functions then.
"""

from __future__ import annotations

import numpy as np

from distbn.ops import _fused_kernels as _k
from distbn.ops import _sync_kernels as _sk
from distbn.ops.fused import fused_geometry, run_kernel

__all__ = ["TrainStep", "train_step"]

_F64 = np.float64
_UNUSED = np.zeros(0)  # float64, as `fused` passes a missing gamma or beta


def train_step(x, reduce_axes):
    """The `TrainStep` for arrays like `x` reduced over `reduce_axes`, or None (no fused
    view: empty, not C-contiguous, not float32/float64, channels not adjacent)."""
    geo = fused_geometry(x, reduce_axes)
    return None if geo is None or len(geo.param_shape) != 1 else TrainStep(geo, x)


class TrainStep:
    """One signature's training forward and backward, one compiled call per half.

    Methods (x, dy: arrays of the signature; gamma, beta, running_*: (C,) arrays of its
    dtype or None):

    * `forward(x, gamma, beta, epsilon, running_mean, running_var, factor)` ->
      (y, count, mean, var, inv_std): one replica's batch statistics, normalisation,
      PyTorch's running update (when running arrays are given and the batch is not
      empty) and 1/√(var + ε).
    * `local_sums(x, shift)` -> (packed, count, mean, m2): `local_packed_sums`.
    * `finish_forward(x, summed, shift, gamma, beta, epsilon, running_mean, running_var,
      factor)` -> (y, mean, var, total, inv_std): `normalize_from_sums` of the summed
      buffer plus the running update with the global count; y is None (nothing done)
      when ill-conditioned, and the caller takes `distbn.ops.sync`'s corrective pass.
    * `backward(dy, x, mean, inv_std, gamma, count)` -> (sums, dx): `train_backward`.
    * `grad_sums(dy, x, mean, inv_std)` -> (2, C) [Σdy, Σdy·x̂]: `backward_sums`.
    * `input_grad(dy, x, summed, mean, inv_std, gamma, count)` -> dx:
      `input_grad_from_sums`.
    """

    __slots__ = ("_rows", "_view", "_flat", "_out_view", "_blocks", "_elementwise",
                 "_no_running", "_size", "_keys")

    def __init__(self, geo, x):
        self._rows = geo.kind == "rows"
        self._size = x.size
        # The kernels' views: `_view` for the reductions (rows (R, C), planes (O, C, I)),
        # `_flat` for the elementwise passes' inputs (rows (R, C), planes (O*C, I)) and
        # `_out_view` for their outputs (rows y's widened rows, planes (O*C, I)).
        self._view = geo.shape2 if self._rows else (geo.outer, geo.nch, geo.inner)
        self._flat = geo.shape2
        self._out_view = geo.wide2 if self._rows else geo.shape2
        self._blocks = (geo.rows_per_block,) if self._rows else geo.reduce_blocks
        self._elementwise = geo.elementwise_args
        # Each kernel is compiled once per x dtype: gamma and beta go in as float64 (as
        # `fused` passes them), running statistics in x's dtype. A second specialisation
        # that differs only in a channel array's dtype crashed numba 0.68's cache loader
        # (the parallel kernels inside; seen 2026-12-02), so there is none.
        self._no_running = np.zeros(0, dtype=x.dtype)
        base = ("step", geo.kind, x.dtype.char)
        self._keys = {name: base + (name,) for name in
                      ("forward", "sums", "finish", "backward", "grad_sums", "input_grad")}

    @staticmethod
    def _channel(v):
        """gamma or beta as the kernels take it: float64 (C,), or the unused stand-in."""
        return _UNUSED if v is None else v if v.dtype == _F64 else v.astype(_F64)

    def _running(self, v):
        return self._no_running if v is None else v

    def forward(self, x, gamma, beta, epsilon, running_mean, running_var, factor):
        out = np.empty_like(x)
        kernel = _sk.rows_train_forward_running if self._rows else _sk.planes_train_forward_running
        args = (self._channel(gamma), self._channel(beta), epsilon, gamma is not None,
                beta is not None, self._running(running_mean), self._running(running_var),
                running_mean is not None, factor)
        if self._rows:
            count, mean, var, inv_std = run_kernel(
                kernel, self._keys["forward"], self._size, x.reshape(self._view),
                *self._blocks, *args, out.reshape(self._out_view), *self._elementwise)
        else:
            count, mean, var, inv_std = run_kernel(
                kernel, self._keys["forward"], self._size, x.reshape(self._view),
                *self._blocks, *args, out.reshape(self._view))
        return out, count, mean, var, inv_std

    def local_sums(self, x, shift):
        kernel = _sk.rows_packed_sums if self._rows else _sk.planes_packed_sums
        return run_kernel(kernel, self._keys["sums"], self._size, x.reshape(self._view),
                          *self._blocks, shift)

    def finish_forward(self, x, summed, shift, gamma, beta, epsilon, running_mean,
                       running_var, factor):
        out = np.empty_like(x)
        kernel = (_sk.rows_finish_forward_running if self._rows
                  else _sk.planes_finish_forward_running)
        mean, var, total, inv_std, ill = run_kernel(
            kernel, self._keys["finish"], self._size, x.reshape(self._flat), summed, shift,
            self._channel(gamma), self._channel(beta), epsilon, gamma is not None,
            beta is not None, self._running(running_mean), self._running(running_var),
            running_mean is not None, factor, out.reshape(self._out_view), *self._elementwise)
        return (None if ill else out), mean, var, total, inv_std

    def backward(self, dy, x, mean, inv_std, gamma, count):
        dx = np.empty_like(x)
        g = self._channel(gamma)
        if self._rows:
            sums = run_kernel(_k.rows_train_backward, self._keys["backward"], self._size,
                              dy.reshape(self._view), x.reshape(self._view), mean, inv_std,
                              g, gamma is not None, count, *self._blocks,
                              dx.reshape(self._out_view), *self._elementwise)
        else:
            sums = run_kernel(_k.planes_train_backward, self._keys["backward"], self._size,
                              dy.reshape(self._view), x.reshape(self._view), mean, inv_std,
                              g, gamma is not None, count, self._blocks[0],
                              dx.reshape(self._view))
        return sums, dx

    def grad_sums(self, dy, x, mean, inv_std):
        kernel = _sk.rows_grad_sums_hat if self._rows else _sk.planes_grad_sums_hat
        return run_kernel(kernel, self._keys["grad_sums"], self._size, dy.reshape(self._view),
                          x.reshape(self._view), mean, inv_std, *self._blocks)

    def input_grad(self, dy, x, summed, mean, inv_std, gamma, count):
        dx = np.empty_like(x)
        kernel = (_sk.rows_input_grad_from_sums if self._rows
                  else _sk.planes_input_grad_from_sums)
        run_kernel(kernel, self._keys["input_grad"], self._size, dy.reshape(self._flat),
                   x.reshape(self._flat), summed, mean, inv_std, self._channel(gamma),
                   gamma is not None, count, dx.reshape(self._out_view), *self._elementwise)
        return dx
