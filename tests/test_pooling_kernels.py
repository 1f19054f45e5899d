"""distbn.ops.pooling: the numba kernels give the numpy reference's bits, and the pooling
layers' gradients match central differences on both kernel backends."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from backends import both as _both
from gradcheck import numeric_grad

import distbn.layers as L
from distbn.ops import backend
from distbn.ops import pooling as P

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba is not installed")
BACKENDS = ["numpy", pytest.param("numba", marks=needs_numba)]

# (input hw, pool, strides, pads): non-overlapping, overlapping with padding on every
# side, uneven pads, stride 1 (every input in several windows).
GEOMETRIES = [((8, 8), (2, 2), (2, 2), ((0, 0), (0, 0))),
              ((7, 9), (3, 3), (2, 1), ((1, 1), (1, 1))),
              ((5, 6), (3, 2), (1, 1), ((1, 1), (0, 1))),
              ((4, 5), (2, 3), (1, 2), ((0, 1), (1, 1))),
              ((7, 8), (2, 2), (3, 3), ((0, 1), (0, 0)))]  # disjoint, with gaps


def _out_hw(hw, pool, strides, pads):
    return tuple((n + sum(p) - k) // s + 1 for n, k, s, p in zip(hw, pool, strides, pads,
                                                                 strict=True))


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hw,pool,strides,pads", GEOMETRIES)
def test_pooling_kernels_equal_the_reference_bitwise(dtype, hw, pool, strides, pads,
                                                     restore_backend):
    rng = np.random.default_rng(0)
    out_hw = _out_hw(hw, pool, strides, pads)
    x = rng.standard_normal((3, *hw, 5)).astype(dtype)
    x[1, :3, :3, 1] = 1.0  # ties: the first maximum wins
    x[2] = np.round(x[2])  # many ties
    x[0, 0, 0, 0] = np.nan  # np.argmax picks the first NaN
    x[0, 1, 2, 3] = -np.inf
    dy = rng.standard_normal((3, *out_hw, 5)).astype(dtype)
    dy[0, 0, 0] = -0.0  # the reference sums into zeros: dx gets +0.0

    (y0, i0), (y1, i1) = _both(lambda: P.max_pool2d_forward(x, pool, strides, pads, out_hw))
    np.testing.assert_array_equal(i0, i1)
    assert i1.dtype == np.uint8 and y1.dtype == dtype
    d0, d1 = _both(lambda: P.max_pool2d_backward(dy, i0, hw, pool, strides, pads))
    (a0, c0), (a1, _) = _both(lambda: P.avg_pool2d_forward(x, pool, strides, pads, out_hw))
    b0, b1 = _both(lambda: P.avg_pool2d_backward(dy, c0, hw, pool, strides, pads))
    for ref, got in ((y0, y1), (d0, d1), (a0, a1), (b0, b1)):
        assert got.dtype == dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)  # NaN where NaN
    for ref, got in ((y0, y1), (d0, d1), (b0, b1)):  # signed zeros too
        np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))

    xg = rng.standard_normal((4, *hw, 9)).astype(dtype)
    dyg = rng.standard_normal((4, 9)).astype(dtype)
    for ref, got in (_both(lambda: P.global_avg_pool2d_forward(xg)),
                     _both(lambda: P.global_avg_pool2d_backward(dyg, xg.shape))):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_pooling_layer_gradients_on_both_backends(kernels, data_format, restore_backend):
    backend.set_backend(kernels)
    rng = np.random.default_rng(3)
    # Distinct values: max pooling is differentiable at the sample point.
    x = rng.permutation(2 * 5 * 5 * 3).reshape(2, 5, 5, 3) / 10.0
    if data_format == "channels_first":
        x = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    layers = [L.MaxPooling2D(3, strides=2, padding="same", data_format=data_format,
                             dtype="float64"),
              L.AveragePooling2D((3, 2), strides=1, padding="same", data_format=data_format,
                                 dtype="float64"),
              L.GlobalAveragePooling2D(data_format=data_format, keepdims=True,
                                       dtype="float64")]
    for layer in layers:
        proj = rng.standard_normal(layer(x).shape)

        def loss(layer=layer, proj=proj):
            return float(np.sum(layer(x) * proj))

        layer(x)
        dx = layer.backward(proj)
        np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8,
                                   err_msg=type(layer).__name__)


def test_pooling_ops_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"NHWC array, got shape \(2, 3\)"):
        P.max_pool2d_forward(np.zeros((2, 3)), (2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1))
    with pytest.raises(ValueError, match=r"idx shape \(1, 1, 1, 2\) differs"):
        P.max_pool2d_backward(np.zeros((1, 1, 1, 1)), np.zeros((1, 1, 1, 2), np.uint8),
                              (2, 2), (2, 2), (2, 2), ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 3\)"):
        P.global_avg_pool2d_backward(np.zeros((2, 4)), (2, 5, 5, 3))
