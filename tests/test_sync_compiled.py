"""`pooled_moments_compiled` (the XLA FFI handlers' statistics) gives the same bits as
`pooled_moments`, with the moving statistics where the global batch is empty."""

import numpy as np
import pytest

from distbn.ops.sync import pooled_moments, pooled_moments_compiled

numba = pytest.importorskip("numba")


@numba.njit
def _twice(desc, buf):  # two identical replicas
    return buf * desc[0]


def _case(kind, rng):
    c = 7
    x = rng.normal(size=(9, c)) * rng.uniform(0.1, 3.0, c)
    if kind == "far":  # ill-conditioned: the shift far from the mean, the corrective pass
        x = x * 1e-4 + 1e3
    count = np.full(c, 9.0)
    mean = x.mean(axis=0)
    m2 = np.square(x - mean).sum(axis=0)
    if kind == "empty":
        count[[1, 4]] = 0.0
        mean[[1, 4]] = m2[[1, 4]] = 0.0
    shift = rng.normal(size=c)
    moving_var = rng.uniform(0.5, 2.0, c)
    return count, mean, m2, shift, moving_var


@pytest.mark.parametrize("kind", ["plain", "far", "empty"])
def test_same_bits_as_pooled_moments(kind):
    count, mean, m2, shift, moving_var = _case(kind, np.random.default_rng(3))
    eps = 1e-3
    want_mean, want_var, want_total = pooled_moments(count, mean, m2, shift, eps,
                                                     lambda buf: buf * 2.0)
    empty = want_total == 0
    want_mean = np.where(empty, shift, want_mean)
    want_var = np.where(empty, moving_var, want_var)
    got = pooled_moments_compiled()(count, mean, m2, shift, moving_var, eps, _twice,
                                    np.array([2.0]))
    for g, w in zip(got, (want_mean, want_var, want_total), strict=True):
        np.testing.assert_array_equal(g, w)
    if kind == "empty":
        assert empty.sum() == 2
