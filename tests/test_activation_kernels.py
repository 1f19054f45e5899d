"""distbn.ops.activation: numba kernels against the numpy reference, gradients against
central differences, and the conventions the layers rely on."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from backends import both as _both
from gradcheck import numeric_grad

from distbn.ops import activation as A
from distbn.ops import backend

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba is not installed")


def _inputs(dtype, shape=(3, 5, 7, 4), seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    # The kinks and the special values: 0, -0, the relu6 top, NaN, +-inf.
    x.flat[:7] = [0.0, -0.0, 6.0, np.nan, np.inf, -np.inf, 0.5]
    return x, rng.standard_normal(shape).astype(dtype)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("params", [dict(), dict(negative_slope=0.3),
                                    dict(threshold=0.5, negative_slope=0.1, max_value=2.0),
                                    dict(max_value=6.0, strict=True)])
def test_relu_kernels_equal_the_reference_bitwise(dtype, params, restore_backend):
    x, dy = _inputs(dtype)
    slope = params.get("negative_slope", 0.0)

    def run():
        y, mask = A.relu_forward(x, **params)
        return y, mask, A.relu_backward(dy, mask, slope)

    (y0, m0, d0), (y1, m1, d1) = _both(run)
    assert m0.dtype == m1.dtype == np.uint8 and m0.shape == x.shape
    np.testing.assert_array_equal(m0, m1)
    assert y1.dtype == d1.dtype == dtype
    for a, b in ((y0, y1), (d0, d1)):  # the same bits, NaN where NaN, signed zeros too
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_activation_equals_the_reference_on_the_numba_backend(dtype, restore_backend):
    x, dy = _inputs(dtype)
    with np.errstate(all="ignore"):
        for name in A.NAMES:
            def run(name=name):
                y, saved = A.forward(name, x)
                return y, A.backward(name, dy, saved)

            (y0, d0), (y1, d1) = _both(run)
            assert y1.dtype == d1.dtype == dtype, name
            # The kernels do the reference's operations in its order and dtype.
            np.testing.assert_array_equal(y1, y0, err_msg=name)
            np.testing.assert_array_equal(d1, d0, err_msg=name)


@pytest.mark.parametrize("kernels", ["numpy", pytest.param("numba", marks=needs_numba)])
def test_backward_matches_central_differences_in_float64(kernels, restore_backend):
    backend.set_backend(kernels)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4)) * 2
    x[np.abs(x) < 0.05] = 0.3  # away from the kinks
    x[np.abs(x - 6) < 0.05] = 5.0
    w = rng.standard_normal(x.shape)
    for name in A.NAMES:
        y, saved = A.forward(name, x)
        got = A.backward(name, w, saved)

        def loss(name=name):
            return float(np.sum(A.forward(name, x)[0] * w))

        np.testing.assert_allclose(got, numeric_grad(loss, x), rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    for params in (dict(negative_slope=0.3, threshold=0.5, max_value=1.5),):
        y, mask = A.relu_forward(x, **params)
        got = A.relu_backward(w, mask, params["negative_slope"])

        def loss(params=params):
            return float(np.sum(A.relu_forward(x, **params)[0] * w))

        np.testing.assert_allclose(got, numeric_grad(loss, x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernels", ["numpy", pytest.param("numba", marks=needs_numba)])
def test_relu_conventions(kernels, restore_backend):
    backend.set_backend(kernels)
    x = np.array([-np.inf, -1.0, 0.0, 1.0, 6.0, np.nan, np.inf], dtype=np.float32)
    dy = np.ones_like(x)
    y, mask = A.relu_forward(x)  # the ReLU layer: slope 1 at the threshold
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 6, np.nan, np.inf])
    np.testing.assert_array_equal(A.relu_backward(dy, mask), [0, 0, 1, 1, 1, 1, 1])
    y, mask = A.forward("relu", x)  # the activation: gradient 0 at 0, as x > 0
    np.testing.assert_array_equal(A.backward("relu", dy, mask), [0, 0, 0, 1, 1, 0, 1])
    y, mask = A.forward("relu6", x)
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 6, np.nan, 6])
    np.testing.assert_array_equal(mask, [0, 0, 0, 1, 2, 0, 2])
    # dy's NaN propagates through the product, as `dy * slope` does.
    nan_dy = np.full_like(x, np.nan)
    assert np.isnan(A.relu_backward(nan_dy, mask)).all()
    # Non-contiguous input: the reference, same answer.
    xs = np.stack([x, x], axis=1)[:, 0]
    np.testing.assert_array_equal(A.relu_forward(xs)[1], A.relu_forward(x.copy())[1])


def test_bad_arguments_are_quoted():
    with pytest.raises(ValueError, match="'gelu'"):
        A.forward("gelu", np.zeros(2))
    with pytest.raises(ValueError, match=r"threshold=nan"):
        A.relu_forward(np.zeros(2), threshold=float("nan"))
    with pytest.raises(ValueError, match=r"mask shape \(3,\) differs from dy's \(2,\)"):
        A.relu_backward(np.zeros(2), np.zeros(3, dtype=np.uint8))


def test_linear_keeps_nothing_and_softmax_keeps_y():
    x = np.arange(6.0).reshape(2, 3)
    y, saved = A.forward("linear", x)
    assert y is x and saved is None
    y, saved = A.forward("softmax", x)
    assert saved is y
    y, saved = A.forward("silu", x)
    assert saved is x
