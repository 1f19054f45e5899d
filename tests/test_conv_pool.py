"""Conv2D and pooling against direct loop implementations, plus gradient checks."""

import itertools
import math

import numpy as np
import pytest
from gradcheck import numeric_grad

import distbn.layers as L
from distbn.layers._common import same_padding

RNG = np.random.default_rng(99)




def check_grads(layer, x, rtol=1e-6, atol=1e-8):
    x = np.array(x, dtype=np.float64)
    proj = RNG.standard_normal(layer(x, training=True).shape)

    def loss():
        return float(np.sum(layer(x, training=True) * proj))

    layer(x, training=True)
    dx = layer.backward(proj)
    analytic = {w.path: w.grad.copy() for w in layer.trainable_weights}
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=rtol, atol=atol)
    for w in layer.trainable_weights:
        np.testing.assert_allclose(analytic[w.path], numeric_grad(loss, w.value),
                                   rtol=rtol, atol=atol, err_msg=w.path)


def tf_same_pads(n, k, s):
    """TensorFlow's documented SAME rule, written out independently of the library."""
    out = math.ceil(n / s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2, out


def conv_reference(x, kernel, bias, strides, padding, dilation=(1, 1)):
    """Direct loops over every output element; x is NHWC."""
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    ekh, ekw = (kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1
    if padding == "same":
        pt, pb, ho = tf_same_pads(h, ekh, strides[0])
        pl, pr, wo = tf_same_pads(w, ekw, strides[1])
    else:
        pt = pb = pl = pr = 0
        ho = (h - ekh) // strides[0] + 1
        wo = (w - ekw) // strides[1] + 1
    xp = np.zeros((n, h + pt + pb, w + pl + pr, c))
    xp[:, pt:pt + h, pl:pl + w] = x
    y = np.zeros((n, ho, wo, f))
    for b, i, j, o in itertools.product(range(n), range(ho), range(wo), range(f)):
        acc = bias[o]
        for a, e in itertools.product(range(kh), range(kw)):
            r, q = i * strides[0] + a * dilation[0], j * strides[1] + e * dilation[1]
            acc += xp[b, r, q] @ kernel[a, e, :, o]
        y[b, i, j, o] = acc
    return y


def test_same_padding_matches_tensorflow_examples():
    # (input, kernel, stride) -> (before, after): the odd pixel goes after.
    assert same_padding(5, 3, 2) == (1, 1)
    assert same_padding(6, 3, 2) == (0, 1)
    assert same_padding(4, 2, 1) == (0, 1)
    assert same_padding(7, 1, 3) == (0, 0)
    assert same_padding(4, 5, 1) == (2, 2)


def test_conv_same_puts_odd_pad_after():
    x = np.arange(9.0).reshape(1, 3, 3, 1)
    layer = L.Conv2D(1, 2, padding="same", use_bias=False, kernel_initializer="ones",
                     dtype="float64")
    y = layer(x)[0, :, :, 0]
    assert y[2, 2] == x[0, 2, 2, 0]  # bottom-right window sees only the last pixel
    assert y[0, 0] == x[0, :2, :2, 0].sum()


CONV_CASES = list(itertools.product(
    ["channels_last", "channels_first"], [1, 2], ["valid", "same"], [(3, 3), (2, 3)]))


@pytest.mark.parametrize("data_format,stride,padding,kernel_size", CONV_CASES)
def test_conv2d_matches_loops(data_format, stride, padding, kernel_size):
    x = RNG.standard_normal((2, 6, 7, 3))
    layer = L.Conv2D(4, kernel_size, strides=stride, padding=padding, data_format=data_format,
                     bias_initializer="random_normal", dtype="float64")
    xin = np.moveaxis(x, -1, 1) if data_format == "channels_first" else x
    y = layer(xin)
    expected = conv_reference(x, layer.kernel.value, layer.bias.value, (stride, stride),
                              padding)
    if data_format == "channels_first":
        expected = np.moveaxis(expected, -1, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    assert layer.compute_output_shape((None,) + xin.shape[1:]) == (None,) + y.shape[1:]


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_conv2d_dilation_matches_loops(padding):
    x = RNG.standard_normal((1, 7, 6, 2))
    layer = L.Conv2D(3, 3, dilation_rate=(2, 1), padding=padding, dtype="float64")
    np.testing.assert_allclose(
        layer(x), conv_reference(x, layer.kernel.value, layer.bias.value, (1, 1), padding,
                                 dilation=(2, 1)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("data_format,stride,padding", [
    ("channels_last", 1, "same"), ("channels_first", 2, "same"),
    ("channels_last", 2, "valid"), ("channels_first", 1, "valid")])
def test_conv2d_gradients(data_format, stride, padding):
    shape = (2, 5, 6, 3) if data_format == "channels_last" else (2, 3, 5, 6)
    layer = L.Conv2D(2, (3, 2), strides=stride, padding=padding, data_format=data_format,
                     activation="tanh", kernel_regularizer="l2", dtype="float64")
    x = RNG.standard_normal(shape)
    layer(x)
    proj = RNG.standard_normal(layer(x).shape)

    def loss():
        return float(np.sum(layer(x) * proj)) + sum(layer.regularization_losses())

    layer(x)
    dx = layer.backward(proj)
    grads = {w.path: w.grad.copy() for w in layer.trainable_weights}
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    for w in layer.trainable_weights:
        np.testing.assert_allclose(grads[w.path], numeric_grad(loss, w.value), rtol=1e-6,
                                   atol=1e-8, err_msg=w.path)


def test_conv2d_dilated_gradients():
    check_grads(L.Conv2D(2, 2, dilation_rate=2, padding="same", dtype="float64"),
                RNG.standard_normal((1, 5, 5, 2)))


def test_conv2d_errors_and_dtype():
    with pytest.raises(ValueError, match="padding='full'"):
        L.Conv2D(2, 3, padding="full")
    with pytest.raises(ValueError, match="kernel_size=0"):
        L.Conv2D(2, 0)
    with pytest.raises(ValueError, match="data_format='nhwc'"):
        L.Conv2D(2, 3, data_format="nhwc")
    with pytest.raises(ValueError, match="groups=2"):
        L.Conv2D(2, 3, groups=2)
    with pytest.raises(ValueError, match="dilation_rate"):
        L.Conv2D(2, 3, strides=2, dilation_rate=2)
    layer = L.Conv2D(2, 3)
    assert layer(np.ones((1, 4, 4, 3))).dtype == np.float32
    assert layer.kernel.shape == (3, 3, 3, 2)
    with pytest.raises(ValueError, match="3 channels"):
        layer(np.ones((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="smaller than"):
        L.Conv2D(2, 5)(np.ones((1, 3, 3, 1)))


def pool_reference(x, pool, strides, padding, kind):
    """Loops over outputs of NHWC x; returns y and, for max, the chosen input index."""
    n, h, w, c = x.shape
    if padding == "same":
        pt, _, ho = tf_same_pads(h, pool[0], strides[0])
        pl, _, wo = tf_same_pads(w, pool[1], strides[1])
    else:
        pt = pl = 0
        ho = (h - pool[0]) // strides[0] + 1
        wo = (w - pool[1]) // strides[1] + 1
    y = np.zeros((n, ho, wo, c))
    dx_of = {}
    for b, i, j, ch in itertools.product(range(n), range(ho), range(wo), range(c)):
        cells = [(r, q) for r in range(i * strides[0] - pt, i * strides[0] - pt + pool[0])
                 for q in range(j * strides[1] - pl, j * strides[1] - pl + pool[1])
                 if 0 <= r < h and 0 <= q < w]
        vals = [x[b, r, q, ch] for r, q in cells]
        if kind == "max":
            k = int(np.argmax(vals))  # first maximum in row-major window order
            y[b, i, j, ch] = vals[k]
            dx_of[b, i, j, ch] = [cells[k]]
        else:
            y[b, i, j, ch] = np.mean(vals)
            dx_of[b, i, j, ch] = cells
    return y, dx_of


def pool_reference_backward(x, dy, dx_of):
    dx = np.zeros_like(x)
    for (b, i, j, ch), cells in dx_of.items():
        for r, q in cells:
            dx[b, r, q, ch] += dy[b, i, j, ch] / len(cells)
    return dx


POOL_CASES = list(itertools.product(
    ["max", "avg"], ["channels_last", "channels_first"], ["valid", "same"],
    [((2, 2), None), ((3, 3), (1, 1)), ((3, 2), (2, 1))]))


@pytest.mark.parametrize("kind,data_format,padding,pool", POOL_CASES)
def test_pooling_matches_loops(kind, data_format, padding, pool):
    pool_size, strides = pool
    # Small integers: many ties, which must resolve to the first maximum.
    x = RNG.integers(0, 3, size=(2, 5, 6, 2)).astype(np.float64)
    cls = L.MaxPooling2D if kind == "max" else L.AveragePooling2D
    layer = cls(pool_size, strides=strides, padding=padding, data_format=data_format,
                dtype="float64")
    xin = np.moveaxis(x, -1, 1) if data_format == "channels_first" else x
    y = layer(xin)
    y_ref, dx_of = pool_reference(x, pool_size, strides or pool_size, padding, kind)
    dy = RNG.standard_normal(y_ref.shape)
    dx_ref = pool_reference_backward(x, dy, dx_of)
    dx = layer.backward(np.moveaxis(dy, -1, 1) if data_format == "channels_first" else dy)
    if data_format == "channels_first":
        y, dx = np.moveaxis(y, 1, -1), np.moveaxis(dx, 1, -1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-12, atol=1e-14)
    assert layer.compute_output_shape(xin.shape) == layer(xin).shape


@pytest.mark.parametrize("cls", [L.MaxPooling2D, L.AveragePooling2D])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_pooling_gradients(cls, padding):
    # Distinct values keep max pooling differentiable at the sample point.
    x = RNG.permutation(2 * 5 * 5 * 2).reshape(2, 5, 5, 2) / 10.0
    check_grads(cls(3, strides=2, padding=padding, dtype="float64"), x)


def test_max_pool_tie_goes_to_first():
    x = np.ones((1, 2, 2, 1))
    layer = L.MaxPooling2D(dtype="float64")
    layer(x)
    np.testing.assert_array_equal(layer.backward(np.ones((1, 1, 1, 1)))[0, :, :, 0],
                                  [[1, 0], [0, 0]])


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("keepdims", [False, True])
def test_global_average_pooling(data_format, keepdims):
    layer = L.GlobalAveragePooling2D(data_format=data_format, keepdims=keepdims,
                                     dtype="float64")
    x = RNG.standard_normal((2, 3, 4, 5))
    axes = (2, 3) if data_format == "channels_first" else (1, 2)
    y = layer(x)
    np.testing.assert_allclose(y, x.mean(axis=axes, keepdims=keepdims))
    assert layer.compute_output_shape(x.shape) == y.shape
    check_grads(layer, x)


def test_pool_defaults():
    layer = L.MaxPooling2D()
    assert layer.pool_size == (2, 2) and layer.strides == (2, 2)
    assert layer.padding == "valid" and layer.data_format == "channels_last"
    assert L.AveragePooling2D(3, strides=1).strides == (1, 1)
    with pytest.raises(ValueError, match="pool_size"):
        L.MaxPooling2D((2, 2, 2))
