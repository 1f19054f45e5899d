"""Dense, Flatten, Activation, ReLU, Dropout: gradients, semantics, configs, registry."""

import numpy as np
import pytest
from gradcheck import numeric_grad

import distbn.layers as L
from distbn.layers import activations

RNG = np.random.default_rng(1234)




def check_layer_grads(layer, x, training=True, rtol=1e-6, atol=1e-8, call_kwargs=None):
    """Backward of L = sum(y * w) (+ penalties) against central differences, float64."""
    call_kwargs = call_kwargs or {}
    x = np.array(x, dtype=np.float64)
    y = layer(x, training=training, **call_kwargs)
    proj = RNG.standard_normal(y.shape)

    def loss():
        out = layer(x, training=training, **call_kwargs)
        return float(np.sum(out * proj)) + sum(layer.regularization_losses())

    layer(x, training=training, **call_kwargs)
    dx = layer.backward(proj)
    analytic = {w.path: w.grad.copy() for w in layer.trainable_weights}
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=rtol, atol=atol)
    for w in layer.trainable_weights:
        np.testing.assert_allclose(analytic[w.path], numeric_grad(loss, w.value),
                                   rtol=rtol, atol=atol, err_msg=w.path)
    return dx


@pytest.mark.parametrize("activation", ["linear", "relu", "sigmoid", "tanh", "softmax"])
def test_dense_gradients(activation):
    layer = L.Dense(4, activation=activation, dtype="float64")
    check_layer_grads(layer, RNG.standard_normal((5, 3)))


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "linear"])
def test_dense_fused_activation_matches_unfused(backend_name, activation):
    """Bias add and activation on the GEMM output in one pass each: the same values as
    the composition written out, and for ReLU only a uint8 mask is kept for backward."""
    import importlib.util

    from distbn.ops import backend

    if backend_name == "numba" and importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    saved_state = dict(backend._state)
    try:
        backend.set_backend(backend_name)
        layer = L.Dense(6, activation=activation, bias_initializer="glorot_uniform")
        x = RNG.standard_normal((7, 2, 5)).astype(np.float32)
        y = layer(x, training=True)
        z = x @ layer.kernel.value + layer.bias.value
        ref = activations.get(activation)
        np.testing.assert_allclose(y, ref(z), rtol=2e-7, atol=1e-7)
        if activation == "relu":
            np.testing.assert_array_equal(y, np.maximum(z, 0))
            kept = layer._cache[1]
            assert kept.dtype == np.uint8 and kept.shape == y.shape
        dy = RNG.standard_normal(y.shape).astype(np.float32)
        dx = layer.backward(dy)
        dz = ref.backward(dy, z, ref(z))
        np.testing.assert_allclose(dx, dz @ layer.kernel.value.T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.bias.grad, dz.reshape(-1, 6).sum(0), rtol=1e-5,
                                   atol=1e-6)
        assert y.dtype == dx.dtype == np.float32
    finally:
        backend._state.update(saved_state)


def test_dense_nd_input_and_regularizers():
    layer = L.Dense(3, dtype="float64", kernel_regularizer="l2", bias_regularizer="l1",
                    bias_initializer="ones")
    x = RNG.standard_normal((2, 4, 5))
    y = layer(x)
    assert y.shape == (2, 4, 3) and layer.compute_output_shape((None, 4, 5)) == (None, 4, 3)
    np.testing.assert_allclose(y, x @ layer.kernel.value + layer.bias.value)
    assert len(layer.losses) == 2 and all(p > 0 for p in layer.losses)
    check_layer_grads(layer, x)


def test_dense_dtypes_and_errors():
    layer = L.Dense(2)
    y = layer(np.ones((3, 4)))
    assert y.dtype == np.float32 and layer.kernel.dtype == np.float32
    assert L.Dense(2, dtype="float64")(np.ones((3, 4), np.float32)).dtype == np.float64
    with pytest.raises(ValueError, match="units=0"):
        L.Dense(0)
    with pytest.raises(ValueError, match="did you mean 'relu'"):
        L.Dense(2, activation="rellu")
    with pytest.raises(ValueError, match=r"expects inputs \(\.\.\., 4\)"):
        layer(np.ones((3, 5)))
    with pytest.raises(TypeError, match="kernel_init"):
        L.Dense(2, kernel_init="zeros")


def test_dense_constraint_and_initializer_objects():
    layer = L.Dense(2, kernel_initializer="zeros", kernel_constraint="non_neg")
    layer(np.ones((1, 3)))
    assert np.all(layer.kernel.value == 0)
    assert layer.kernel.constraint is not None
    cfg = layer.get_config()
    assert cfg["kernel_constraint"]["class_name"] == "NonNeg"
    assert cfg["kernel_initializer"]["class_name"] == "Zeros"


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_flatten(data_format):
    layer = L.Flatten(data_format=data_format, dtype="float64")
    x = RNG.standard_normal((2, 3, 4, 5))
    y = layer(x)
    expected = (np.moveaxis(x, 1, -1) if data_format == "channels_first" else x).reshape(2, -1)
    np.testing.assert_array_equal(y, expected)
    assert layer.compute_output_shape((None, 3, 4, 5)) == (None, 60)
    check_layer_grads(layer, x)


@pytest.mark.parametrize("name", sorted(activations.names()))
def test_activation_gradients(name):
    x = RNG.standard_normal((4, 6))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kinks of relu-like functions
    x[np.abs(x - 6) < 1e-3] = 5.0
    check_layer_grads(L.Activation(name, dtype="float64"), x, rtol=1e-5)


def test_activation_values():
    x = np.array([[-2.0, 0.5, 3.0]])
    np.testing.assert_allclose(L.Activation("relu", dtype="float64")(x), [[0, 0.5, 3]])
    np.testing.assert_allclose(L.Activation("sigmoid", dtype="float64")(x),
                               1 / (1 + np.exp(-x)))
    sm = L.Activation("softmax", dtype="float64")(x)
    np.testing.assert_allclose(sm, np.exp(x) / np.exp(x).sum())
    with pytest.raises(ValueError, match="callable has no backward"):
        L.Activation(np.tanh)


def test_relu_variants():
    x = np.array([[-3.0, -0.5, 0.2, 0.7, 2.5, 9.0]])
    layer = L.ReLU(max_value=2.0, negative_slope=0.1, threshold=0.5, dtype="float64")
    expected = np.where(x >= 2.0, 2.0, np.where(x >= 0.5, x, 0.1 * (x - 0.5)))
    np.testing.assert_allclose(layer(x), expected)
    check_layer_grads(layer, x)
    check_layer_grads(L.ReLU(dtype="float64"), RNG.standard_normal((3, 4)) + 0.01)
    with pytest.raises(ValueError, match="negative_slope=-1"):
        L.ReLU(negative_slope=-1)
    assert L.ReLU().name.startswith("re_lu")


def test_dropout_split_batches_match_one_batch():
    x = RNG.standard_normal((12, 7))
    ids = np.arange(100, 112)
    whole = L.Dropout(0.4, seed=7, dtype="float64")(x, training=True, sample_ids=ids, step=3)
    # Uneven slices (including an empty one), each through a fresh layer as on another rank.
    pieces = []
    for lo, hi in [(0, 5), (5, 5), (5, 9), (9, 12)]:
        layer = L.Dropout(0.4, seed=7, dtype="float64")
        pieces.append(layer(x[lo:hi], training=True, sample_ids=ids[lo:hi], step=3))
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    # A permuted batch gives each sample its own mask back.
    perm = RNG.permutation(12)
    shuffled = L.Dropout(0.4, seed=7, dtype="float64")(x[perm], training=True,
                                                       sample_ids=ids[perm], step=3)
    np.testing.assert_array_equal(shuffled, whole[perm])


def test_dropout_semantics():
    x = RNG.standard_normal((200, 50)) + 3.0
    layer = L.Dropout(0.25, seed=1, dtype="float64")
    np.testing.assert_array_equal(layer(x), x)  # training=None is inference
    np.testing.assert_array_equal(layer(x, training=False), x)
    np.testing.assert_array_equal(L.Dropout(0.0)(x, training=True), x.astype(np.float32))
    y = layer(x, training=True, step=0)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.75)
    assert abs(1 - kept.mean() - 0.25) < 0.02
    dy = RNG.standard_normal(x.shape)
    np.testing.assert_allclose(layer.backward(dy), dy * kept / 0.75, rtol=1e-15)
    assert not np.array_equal(layer(x, training=True, step=1) != 0, kept)
    # Without step, successive training calls draw fresh masks.
    a = layer(x, training=True)
    b = layer(x, training=True)
    assert not np.array_equal(a != 0, b != 0)
    np.testing.assert_array_equal(L.Dropout(1.0)(x, training=True), 0)
    check_layer_grads(L.Dropout(0.5, seed=3, dtype="float64"), RNG.standard_normal((4, 5)),
                      call_kwargs={"step": 0})


def test_dropout_noise_shape_and_errors():
    x = np.ones((4, 3, 5))
    y = L.Dropout(0.5, noise_shape=(None, 1, 5), seed=2)(x, training=True)
    np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1, :], y.shape))
    with pytest.raises(ValueError, match="rate=1.5"):
        L.Dropout(1.5)
    with pytest.raises(ValueError, match="one id per row"):
        L.Dropout(0.5)(x, training=True, sample_ids=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        L.Dropout(0.5)(x, training=True, sample_ids=[0, 1, -2, 3])


LAYERS = [
    lambda: L.Dense(3, activation="relu", use_bias=False, kernel_regularizer="l2"),
    lambda: L.Flatten(data_format="channels_first"),
    lambda: L.Activation("tanh"),
    lambda: L.ReLU(max_value=6.0),
    lambda: L.Dropout(0.3, seed=5),
    lambda: L.Conv2D(4, (3, 2), strides=2, padding="same", data_format="channels_first"),
    lambda: L.MaxPooling2D(3, strides=1, padding="same"),
    lambda: L.AveragePooling2D(),
    lambda: L.GlobalAveragePooling2D(keepdims=True),
]


@pytest.mark.parametrize("make", LAYERS)
def test_config_round_trip_and_registry(make):
    layer = make()
    cfg = layer.get_config()
    again = type(layer).from_config(cfg)
    assert again.get_config() == cfg
    rebuilt = L.deserialize(L.serialize(layer))
    assert type(rebuilt) is type(layer) and rebuilt.get_config() == cfg
    keras_style = L.deserialize({"class_name": type(layer).__name__, "config": cfg})
    assert keras_style.get_config() == cfg


def test_registry_errors_and_lazy_batchnorm():
    with pytest.raises(ValueError, match="did you mean 'Conv2D'"):
        L.get_layer_class("Conv2d")
    with pytest.raises(ValueError, match="unknown layer type 'Nope'"):
        L.deserialize({"type": "Nope"})
    with pytest.raises(ValueError, match="bad arguments for layer type 'Dense'"):
        L.deserialize({"type": "Dense", "units": 2, "bogus": 1})
    assert L.get_layer_class("MaxPool2D") is L.MaxPooling2D
    assert L.get_layer_class("BatchNormalization").__name__ == "BatchNormalization"


@pytest.mark.parametrize("make", LAYERS)
def test_empty_local_batch(make):
    # A rank may hold no rows of a global batch: every layer must pass zero rows through.
    layer = make()
    shape = (3, 6, 6, 4) if isinstance(layer, (L.Conv2D, L.MaxPooling2D, L.AveragePooling2D,
                                               L.GlobalAveragePooling2D, L.Flatten)) else (3, 5)
    layer(np.ones(shape), training=True)
    y = layer(np.ones((0,) + shape[1:]), training=True)
    assert y.shape[0] == 0
    dx = layer.backward(np.zeros(y.shape))
    assert dx.shape == (0,) + shape[1:]
    for w in layer.trainable_weights:
        assert w.grad.shape == w.shape and not np.any(w.grad - (
            w.regularizer.gradient(w.value) if w.regularizer else 0))
