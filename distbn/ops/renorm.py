"""Batch renormalization (Ioffe 2017) as Keras 3.14+ defines it: pure functions, no state.

Training with `renorm=True` normalises with the batch statistics (mean μ, biased
variance σ², stddev s = sqrt(σ² + ε)) and then applies the corrections

    r = clip(s / max(σ_R, sqrt ε), rmin, rmax),   d = clip((μ − μ_R) / max(σ_R, sqrt ε), ±dmax)

(μ_R, σ_R: the `renorm_mean` / `renorm_stddev` weights before this step) as constants:
`y = γ(x̂·r + d) + β = x̂·(γr) + (γd + β)`. So the forward is `normalize` with the composed
scale γr and offset γd + β, and the backward is plain BN's with γ replaced by γr (r and d
are `stop_gradient`ed), plus `dγ = r·Σdy·x̂ + d·Σdy`, `dβ = Σdy`.

Updates (`update_renorm`), from the same μ and s:
    μ_R ← μ_R·ρ + μ(1 − ρ),  σ_R ← σ_R·ρ + s(1 − ρ)          ρ = renorm_momentum
    m ← m·momentum + μ(1 − momentum),  σ_m ← σ_m·momentum + s(1 − momentum)
    v ← max(σ_m² − ε, 0)                                      v derived from moving_stddev
"""

from __future__ import annotations

import numpy as np

__all__ = ["renorm_correction", "compose_transforms", "update_renorm"]

_F64 = np.float64


def renorm_correction(mean, var, epsilon, renorm_mean, renorm_stddev, rmin=None, rmax=None,
                      dmax=None):
    """The clipped corrections (r, d) of batch renormalization, in float64.

    Args:
        mean, var: float64 channel arrays, the batch mean and biased variance.
        epsilon: the layer's epsilon.
        renorm_mean, renorm_stddev: the renorm moving statistics before the update.
        rmin, rmax, dmax: clipping bounds; None leaves that side unclipped.

    Returns:
        (r, d): float64 channel arrays.
    """
    stddev = np.sqrt(np.asarray(var, dtype=_F64) + epsilon)
    # The floor keeps r and d finite while renorm_stddev is still near 0.
    denom = np.maximum(np.asarray(renorm_stddev, dtype=_F64), np.sqrt(epsilon))
    r = stddev / denom
    d = (np.asarray(mean, dtype=_F64) - np.asarray(renorm_mean, dtype=_F64)) / denom
    if rmin is not None:
        r = np.maximum(r, rmin)
    if rmax is not None:
        r = np.minimum(r, rmax)
    if dmax is not None:
        d = np.clip(d, -dmax, dmax)
    return r, d


def compose_transforms(r, d, gamma, beta):
    """The effective scale and offset `(γr, γd + β)`; γ None means 1, β None means 0.

    Returns:
        (scale, offset): float64 channel arrays (never None).
    """
    if gamma is None:
        scale, offset = np.array(r, dtype=_F64), np.array(d, dtype=_F64)
    else:
        scale, offset = r * gamma, d * gamma
    if beta is not None:
        offset = offset + beta
    return scale, offset


def update_renorm(moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev,
                  count, mean, var, epsilon, momentum, renorm_momentum):
    """Update the five renorm statistics in place (float64 maths, rounded once each).

    Channels with no position (count 0) or non-finite statistics keep all five, as
    `distbn.ops.batch_norm.update_moving` keeps the plain layer's.

    Args:
        moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev: the
            weights' arrays, updated in place.
        count, mean, var: float64 channel arrays of the batch.
        epsilon, momentum, renorm_momentum: the layer's.
    """
    stddev = np.sqrt(np.asarray(var, dtype=_F64) + epsilon)
    keep = ~((count > 0) & np.isfinite(mean) & np.isfinite(stddev))

    def blend(arr, value, mom):
        old = arr.astype(_F64)
        new = old * mom + value * (1.0 - mom)
        arr[...] = np.where(keep, old, new) if keep.any() else new

    blend(renorm_mean, mean, renorm_momentum)
    blend(renorm_stddev, stddev, renorm_momentum)
    blend(moving_mean, mean, momentum)
    blend(moving_stddev, stddev, momentum)
    # Derived from the stored moving_stddev (ReLU against rounding), as Keras does.
    ms = moving_stddev.astype(_F64)
    derived = np.maximum(ms * ms - epsilon, 0.0)
    moving_variance[...] = np.where(keep, moving_variance, derived) if keep.any() else derived
