"""Convolution kernels (`distbn.ops.conv`): the numba path against the numpy reference.

Forward: the same bits (the same im2col copy and GEMM). Input gradient: rounding-level
agreement (one GEMM instead of one per tap), the same bits run to run and at any
thread count. col2im is im2col's adjoint; float64 layer gradients match central
differences on both backends (strides, dilation, padding, both data formats, Conv1D
groups).
"""

import importlib.util

import numpy as np
import pytest
from gradcheck import numeric_grad

import distbn.layers as L
from distbn.layers._common import conv_output_length, pad_amounts
from distbn.ops import backend
from distbn.ops import conv as C

HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
RNG = np.random.default_rng(20)


def geometry(hw, k, strides, dilation, padding):
    pads = pad_amounts(hw, k, strides, dilation, padding)
    out = tuple(conv_output_length(n, kk, padding, s, d)
                for n, kk, s, d in zip(hw, k, strides, dilation, strict=True))
    return pads, out


# (n, h, w, c, f, kernel, strides, dilation, padding)
CASES = [
    (3, 7, 6, 2, 4, (3, 3), (1, 1), (1, 1), "same"),
    (2, 8, 7, 3, 5, (3, 2), (2, 1), (1, 1), "same"),
    (2, 9, 9, 2, 3, (2, 3), (2, 3), (1, 1), "valid"),
    (2, 7, 8, 3, 2, (3, 3), (1, 1), (2, 1), "same"),
    (1, 9, 9, 2, 3, (2, 2), (1, 1), (3, 2), "valid"),
    (2, 5, 5, 1, 2, (5, 5), (1, 1), (1, 1), "same"),  # kernel as large as the image
    (0, 6, 6, 2, 3, (3, 3), (1, 1), (1, 1), "same"),  # an empty shard
    (64, 8, 8, 16, 32, (3, 3), (1, 1), (1, 1), "same"),  # quickstart's second conv: threads
]


def run(name, x, kernel, strides, dilation, padding, dz, layout="channels_last"):
    """Forward and backward on backend `name`; x is NHWC (a channels-last view of an NCHW
    array for layout="channels_first")."""
    backend.set_backend(name)
    if layout == "channels_first":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, -1, 1)), 1, -1)
    pads, out = geometry(x.shape[1:3], kernel.shape[:2], strides, dilation, padding)
    z, cache = C.conv2d_forward(x, kernel, strides, dilation, pads, out)
    dx, dk = C.conv2d_backward(dz, cache, kernel)
    return z, dx, dk


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_numba_matches_reference(case, dtype, layout, restore_backend):
    n, h, w, c, f, k, s, d, padding = case
    x = RNG.standard_normal((n, h, w, c)).astype(dtype)
    kernel = RNG.standard_normal(k + (c, f)).astype(dtype)
    _, out = geometry((h, w), k, s, d, padding)
    dz = RNG.standard_normal((n,) + out + (f,)).astype(dtype)
    z0, dx0, dk0 = run("numpy", x, kernel, s, d, padding, dz, layout)
    z1, dx1, dk1 = run("numba", x, kernel, s, d, padding, dz, layout)
    np.testing.assert_array_equal(z1, z0)
    np.testing.assert_array_equal(dk1, dk0)
    tol = 2e-6 if dtype == np.float32 else 1e-14
    scale = np.abs(dz).sum(axis=(1, 2, 3)).max(initial=1.0) * np.abs(kernel).max()
    np.testing.assert_allclose(dx1, dx0, rtol=0, atol=tol * scale)
    assert dx1.dtype == dtype and dk1.dtype == dtype and z1.dtype == dtype


@needs_numba
def test_numba_is_deterministic_across_threads(restore_backend):
    import numba

    n, h, w, c, f, k, s, d, padding = CASES[-1]
    x = RNG.standard_normal((n, h, w, c)).astype(np.float32)
    kernel = RNG.standard_normal(k + (c, f)).astype(np.float32)
    dz = RNG.standard_normal((n, h, w, f)).astype(np.float32)
    first = run("numba", x, kernel, s, d, padding, dz)
    threads = numba.get_num_threads()
    try:
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            again = run("numba", x, kernel, s, d, padding, dz)
            for a, b in zip(first, again, strict=True):
                np.testing.assert_array_equal(a, b)
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("name", ["numpy", "numba"])
@pytest.mark.parametrize("case", CASES[:6])
def test_col2im_is_the_adjoint_of_im2col(name, case, restore_backend):
    if name == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    backend.set_backend(name)
    n, h, w, c, _, k, s, d, padding = case
    pads, out = geometry((h, w), k, s, d, padding)
    x = RNG.standard_normal((n, h, w, c))
    cols = C.im2col(x, k, s, d, pads, out)
    g = RNG.standard_normal(cols.shape)
    back = C.col2im(g, x.shape, k, s, d, pads, out)
    assert np.isclose(np.sum(cols * g), np.sum(x * back), rtol=1e-12)


@needs_numba
def test_kept_and_recomputed_im2col_agree(restore_backend):
    backend.set_backend("numba")
    n, h, w, c, f, k, s, d, padding = CASES[1]
    x = RNG.standard_normal((n, h, w, c))
    kernel = RNG.standard_normal(k + (c, f))
    pads, out = geometry((h, w), k, s, d, padding)
    dz = RNG.standard_normal((n,) + out + (f,))
    results = []
    for keep in (True, False):
        z, cache = C.conv2d_forward(x, kernel, s, d, pads, out, keep_cols=keep)
        assert (cache[-1] is not None) == keep
        results.append((z, *C.conv2d_backward(dz, cache, kernel)))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
    assert C.keep_im2col((3, 3, 3, 16)) and not C.keep_im2col((3, 3, 16, 32))
    dx, dk = C.conv2d_backward(dz, cache, kernel, input_grad=False)
    assert dx is None
    np.testing.assert_array_equal(dk, results[0][2])


def check_layer_grads(layer, x):
    proj = RNG.standard_normal(layer(x, training=True).shape)

    def loss():
        return float(np.sum(layer(x, training=True) * proj))

    layer(x, training=True)
    dx = layer.backward(proj)
    analytic = {wt.path: wt.grad.copy() for wt in layer.trainable_weights}
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    for wt in layer.trainable_weights:
        np.testing.assert_allclose(analytic[wt.path], numeric_grad(loss, wt.value),
                                   rtol=1e-6, atol=1e-8, err_msg=wt.path)


@pytest.mark.parametrize("name", ["numpy", "numba"])
@pytest.mark.parametrize("args", [
    dict(strides=(2, 1), padding="same", data_format="channels_first"),
    dict(dilation_rate=(1, 2), padding="same"),
    dict(strides=(1, 2), padding="valid", activation="tanh"),
])
def test_conv2d_central_differences(name, args, restore_backend):
    if name == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    backend.set_backend(name)
    layer = L.Conv2D(2, (3, 2), dtype="float64", bias_initializer="glorot_uniform", **args)
    shape = (2, 2, 5, 6) if args.get("data_format") == "channels_first" else (2, 5, 6, 2)
    check_layer_grads(layer, RNG.standard_normal(shape))


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_conv1d_groups_central_differences(name, restore_backend):
    if name == "numba" and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    backend.set_backend(name)
    layer = L.Conv1D(4, 3, strides=2, padding="causal", groups=2, dtype="float64")
    check_layer_grads(layer, RNG.standard_normal((2, 7, 4)))


@needs_numba
def test_float16_uses_the_reference(restore_backend):
    x = RNG.standard_normal((2, 6, 6, 3)).astype(np.float16)
    outs = []
    for name in ("numpy", "numba"):
        backend.set_backend(name)
        layer = L.Conv2D(4, 3, padding="same", dtype="float16", kernel_initializer="ones")
        y = layer(x, training=True)
        outs.append((y, layer.backward(np.ones_like(y))))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float16
