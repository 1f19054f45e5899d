"""Pure kernels: no state, no MPI (numpy reference implementations)."""

from distbn.ops import batch_norm
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
    unpack_moments,
)

__all__ = [
    "batch_norm", "backward_sums", "input_grad", "inverse_std", "local_mean_m2",
    "local_moments", "moments_from_sums", "normalize", "pack_moments", "reduce_axes_for",
    "shifted_sums", "unpack_moments",
]
