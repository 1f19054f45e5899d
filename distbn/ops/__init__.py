"""Pure kernels: no state, no MPI.

`distbn.ops.batch_norm` is the numpy reference (re-exported here); `distbn.ops.fused`
the optional numba kernels with the same functions. `kernels()` returns the active one
(`DISTBN_KERNELS=numpy|numba`, default: numba when installed), `backend_name()` names it.
`distbn.ops.conv` (Conv2D's im2col + GEMM) follows the same switch.
"""

from distbn.ops import batch_norm, conv
from distbn.ops.backend import backend_info, backend_name, kernels, set_backend
from distbn.ops.batch_norm import (
    backward_sums,
    input_grad,
    inverse_std,
    local_mean_m2,
    local_moments,
    moments_from_sums,
    normalize,
    pack_moments,
    reduce_axes_for,
    shifted_sums,
    train_backward,
    train_forward,
    unpack_moments,
    update_moving,
)
from distbn.ops.conv import conv2d_backward, conv2d_forward
from distbn.ops.sync import (
    centred_var,
    ill_conditioned,
    pooled_moments,
    synchronized_backward,
    synchronized_moments,
    synchronized_train_forward,
)

__all__ = [
    "batch_norm", "conv", "conv2d_forward", "conv2d_backward",
    "backward_sums", "input_grad", "inverse_std", "local_mean_m2",
    "local_moments", "moments_from_sums", "normalize", "pack_moments", "reduce_axes_for",
    "shifted_sums", "unpack_moments", "kernels", "backend_name", "backend_info",
    "set_backend", "train_backward", "train_forward", "update_moving",
    "centred_var", "ill_conditioned", "pooled_moments", "synchronized_backward",
    "synchronized_moments",
    "synchronized_train_forward",
]
