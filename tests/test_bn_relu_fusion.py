"""BatchNormalization fused with a following ReLU: the same bits as the two layers run
one after the other (outputs, gradients, moving statistics), on both kernel backends;
which pairs a model fuses; the one-pass kernel against the two steps."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import distbn.layers as L
from distbn import Model, Sequential
from distbn.ops import activation as A
from distbn.ops import backend

BACKENDS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="numba is not installed"))]


def _cnn(dtype, bn_kwargs=None, relu_kwargs=None):
    bn_kwargs = {"momentum": 0.9, **(bn_kwargs or {})}
    layers = [L.Conv2D(4, 3, padding="same", use_bias=False, dtype=dtype,
                     kernel_initializer="he_normal"),
            L.BatchNormalization(dtype=dtype, **bn_kwargs),
            L.ReLU(dtype=dtype, **(relu_kwargs or {})),
            L.MaxPooling2D(dtype=dtype),
            L.Conv2D(6, 3, padding="same", dtype=dtype),
            L.BatchNormalization(dtype=dtype, **bn_kwargs),
            L.ReLU(dtype=dtype, **(relu_kwargs or {})),
            L.GlobalAveragePooling2D(dtype=dtype), L.Dense(3, dtype=dtype)]
    for i, layer in enumerate(layers):  # the twins' weights share names
        layer.name = f"l{i}"
    return layers


def _run(model, x, dy, steps=2):
    """Outputs, input gradients, weight gradients and moving statistics of a few
    training steps (with a weight change between them) and one inference call."""
    out = []
    for _ in range(steps):
        y = model(x, training=True)
        dx = model.backward(dy)
        out += [y, dx] + [w.grad.copy() for w in model.trainable_weights]
        for w in model.trainable_weights:
            w.assign(w.value - 0.05 * w.grad)
    out += [w.numpy() for w in model.non_trainable_weights]
    out.append(model(x, training=False))
    return out


def _twins(layers_fn):
    """The same model twice (same weights): fused, and with every layer separate."""
    fused, plain = Sequential(layers_fn()), Sequential(layers_fn())
    plain.fuse_activations = False
    return fused, plain


@pytest.mark.parametrize("kernels", BACKENDS)
@pytest.mark.parametrize("dtype,bn_kwargs,relu_kwargs", [
    ("float32", None, None),
    ("float64", {"center": False}, {"negative_slope": 0.1, "threshold": 0.2,
                                    "max_value": 1.5}),
    ("float32", {"renorm": True}, None),
    ("float32", {"virtual_batch_size": 2}, None),
    ("float64", {"trainable": False}, None),  # frozen: inference statistics, affine backward
])
def test_fused_model_gives_the_same_bits(kernels, dtype, bn_kwargs, relu_kwargs,
                                         restore_backend):
    backend.set_backend(kernels)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 6, 3)).astype(dtype)
    dy = rng.standard_normal((4, 3)).astype(dtype)
    fused, plain = _twins(lambda: _cnn(dtype, bn_kwargs, relu_kwargs))
    fused.build((None, 6, 6, 3))
    plain.build((None, 6, 6, 3))
    plain.set_weight_dict(fused.get_weight_dict())
    assert fused.apply_fusion() == [(fused.layers[1].name, fused.layers[2].name),
                              (fused.layers[5].name, fused.layers[6].name)]
    assert plain.apply_fusion() == []
    for a, b in zip(_run(fused, x, dy), _run(plain, x, dy), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_which_pairs_fuse():
    def bn(name, **kw):
        return L.BatchNormalization(name=name, **kw)

    # The BN's output read by another layer too (a residual branch): not fused.
    graph = Model([L.Dense(4, name="d"), bn("bn"), L.ReLU(name="r"),
                   L.Add(name="add"), bn("bn2"), L.ReLU(name="r2", max_value=6.0)],
                  inputs={"add": ["r", "bn"]})
    graph.build((None, 3))
    assert graph.apply_fusion() == [("bn2", "r2")]
    # Not a plain ReLU layer, a float16 policy, a BN that is the model's output.
    seq = Sequential([L.Dense(4), bn("b1"), L.Activation("relu"), bn("b2", dtype="float16"),
                      L.ReLU(dtype="float16"), bn("b3")])
    seq.build((None, 3))
    assert seq.apply_fusion() == []
    # Config and weights do not change with fusion.
    fused = Sequential(_cnn("float32"))
    fused.build((None, 6, 6, 3))
    assert len(fused.apply_fusion()) == 2
    config = fused.get_config()
    assert all("fuse" not in str(c) for c in config["layers"])
    rebuilt = Sequential.from_config(config)
    rebuilt.build((None, 6, 6, 3))
    assert list(rebuilt.get_weight_dict()) == list(fused.get_weight_dict())


@pytest.mark.parametrize("kernels", BACKENDS)
def test_normalize_relu_equals_the_two_steps(kernels, restore_backend):
    backend.set_backend(kernels)
    rng = np.random.default_rng(1)
    for dtype, shape, red in ((np.float32, (8, 5, 5, 16), (0, 1, 2)),
                              (np.float64, (8, 16, 5, 5), (0, 2, 3))):  # channels first
        x = rng.standard_normal(shape).astype(dtype)
        c = shape[-1] if red == (0, 1, 2) else shape[1]
        mean, var = rng.standard_normal(c) * 0.1, rng.random(c) + 0.5
        gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
        if red == (0, 2, 3):
            mean, var = mean.reshape(c), var.reshape(c)
        for params in ({}, {"negative_slope": 0.1, "threshold": 0.2, "max_value": 1.0}):
            y, mask = A.normalize_relu(x, mean, var, gamma, beta, 1e-3, red, **params)
            ref = backend.kernels().normalize(x, mean, var, gamma, beta, 1e-3, red)
            y_ref, mask_ref = A.relu_forward(ref, **params)
            np.testing.assert_array_equal(y.view(np.uint8), y_ref.view(np.uint8))
            np.testing.assert_array_equal(mask, mask_ref)
