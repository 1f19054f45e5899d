"""BatchNormalization layer: semantics, gradients, dtypes, masks, config, weights, errors."""

import json
import warnings
import zlib

import numpy as np
import pytest
from gradcheck import numeric_grad

import distbn
from distbn import BatchNormalization


def _loss_and_grads(layer, x, w, training, mask=None):
    y = layer(x, training=training, mask=mask)
    return float((y * w).sum()), layer.backward(w)




GRAD_CASES = [
    # (shape, axis, mask shape or None)
    ((6, 3), -1, None),
    ((6, 3), 0, None),
    ((4, 3, 5), 1, None),
    ((4, 3, 5), -1, (4, 3)),
    ((4, 3, 5), 1, (4, 3)),          # mask broadcast along the last (reduced) axis
    ((3, 2, 4, 3), (1, 3), None),    # tuple axis: per-position parameters
    ((3, 2, 4, 3), (1, 3), (3, 2, 4)),
    ((5, 4), 0, (5,)),
]


@pytest.mark.parametrize("shape,axis,mask_shape", GRAD_CASES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False),
                                          (False, False)])
def test_gradients_central_differences(shape, axis, mask_shape, training, center, scale):
    rng = np.random.default_rng(zlib.crc32(repr((shape, axis, mask_shape)).encode()))
    x = rng.normal(1.0, 2.0, shape)
    w = rng.normal(size=shape)
    mask = None
    if mask_shape is not None:
        mask = rng.random(mask_shape) < 0.6
        mask.flat[:2] = True
    layer = BatchNormalization(axis=axis, momentum=0.7, center=center, scale=scale,
                               dtype="float64")
    layer.build(shape)
    pshape = layer.moving_mean.shape
    weights = ([rng.normal(size=pshape)] if scale else []) + \
              ([rng.normal(size=pshape)] if center else []) + \
              [rng.normal(size=pshape), rng.random(pshape) + 0.5]
    layer.set_weights(weights)

    def f():
        layer.set_weights(weights)  # training calls move the moving stats: reset them
        return float((layer(x, training=training, mask=mask) * w).sum())

    f()
    dx = layer.backward(w)
    np.testing.assert_allclose(dx, numeric_grad(f, x), rtol=1e-6, atol=1e-7)
    if scale:
        np.testing.assert_allclose(layer.gamma.grad, numeric_grad(f, weights[0]),
                                   rtol=1e-6, atol=1e-7)
    if center:
        np.testing.assert_allclose(layer.beta.grad, numeric_grad(f, weights[int(scale)]),
                                   rtol=1e-6, atol=1e-7)


def test_known_values_momentum_zero_and_successive_calls():
    rng = np.random.default_rng(0)
    layer = BatchNormalization(momentum=0.0, epsilon=1e-3, dtype="float64")
    x = rng.normal(3.0, 2.0, (10, 4))
    y = layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(0), rtol=1e-12)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3), rtol=1e-12)

    layer = BatchNormalization(momentum=0.5, dtype="float64")
    mm, mv = np.zeros(4), np.ones(4)
    for _ in range(3):
        x = rng.normal(1.0, 3.0, (7, 4))
        layer(x, training=True)
        mm, mv = 0.5 * mm + 0.5 * x.mean(0), 0.5 * mv + 0.5 * x.var(0)
        np.testing.assert_allclose(layer.moving_mean.numpy(), mm, rtol=1e-12)
        np.testing.assert_allclose(layer.moving_variance.numpy(), mv, rtol=1e-12)
    # inference uses the moving statistics
    x = rng.normal(size=(5, 4))
    y = layer(x)
    np.testing.assert_allclose(y, (x - mm) / np.sqrt(mv + 1e-3), rtol=1e-12)


@pytest.mark.parametrize("training", [None, False])
def test_training_none_or_false_is_inference(training):
    layer = BatchNormalization(dtype="float64")
    x = np.random.default_rng(1).normal(5.0, 2.0, (8, 3))
    y = layer(x, training=training)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), 0.0)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), 1.0)


def test_trainable_false_runs_inference_and_changes_nothing():
    layer = BatchNormalization(dtype="float64")
    x = np.random.default_rng(2).normal(5.0, 2.0, (8, 3))
    layer(x, training=True)
    before = layer.get_weights()
    layer.trainable = False
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 4
    y = layer(x, training=True)
    mm, mv = before[2], before[3]
    np.testing.assert_allclose(y, (x - mm) / np.sqrt(mv + 1e-3) * before[0] + before[1])
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    dx = layer.backward(np.ones_like(y))
    np.testing.assert_allclose(dx, np.ones_like(x) / np.sqrt(mv + 1e-3))
    assert layer.gamma.grad is None  # frozen: no parameter gradients


def test_masked_statistics_and_all_positions_normalised():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6, 3))
    mask = rng.random((4, 6)) < 0.5
    mask[0, 0] = True
    layer = BatchNormalization(momentum=0.0, dtype="float64")
    y = layer(x, training=True, mask=mask)
    sel = x[mask]  # (n, 3): the unmasked positions
    np.testing.assert_allclose(layer.moving_mean.numpy(), sel.mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), sel.var(0), rtol=1e-12)
    np.testing.assert_allclose(y, (x - sel.mean(0)) / np.sqrt(sel.var(0) + 1e-3), rtol=1e-12)
    # 0/1 numeric masks are binarised like boolean ones
    layer2 = BatchNormalization(momentum=0.0, dtype="float64")
    np.testing.assert_allclose(layer2(x, training=True, mask=mask.astype(np.float32) * 3), y)


def test_fully_masked_channel_keeps_moving_stats():
    x = np.random.default_rng(4).normal(size=(3, 2, 4))
    mask = np.ones((3, 2), dtype=bool)
    mask[:, 1] = False  # axis 1 is the channel axis: channel 1 has no unmasked position
    layer = BatchNormalization(axis=1, momentum=0.0, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x, training=True, mask=mask)
    assert layer.moving_mean.numpy()[1] == 0.0 and layer.moving_variance.numpy()[1] == 1.0
    np.testing.assert_allclose(y[:, 1], x[:, 1] / np.sqrt(1 + 1e-3))
    np.testing.assert_allclose(layer.moving_mean.numpy()[0], x[:, 0].mean())


def test_empty_batch_training_is_quiet_and_changes_nothing():
    layer = BatchNormalization()
    layer(np.ones((2, 3), np.float32), training=True)
    before = layer.get_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(np.zeros((0, 3), np.float32), training=True)
        dx = layer.backward(np.zeros((0, 3)))
    assert y.shape == (0, 3) and y.dtype == np.float32 and dx.shape == (0, 3)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(layer.gamma.grad, 0.0)


def test_dtypes_float16_float64_mixed():
    x16 = np.random.default_rng(5).normal(2.0, 3.0, (16, 4)).astype(np.float16)
    layer = BatchNormalization()
    y = layer(x16, training=True)
    assert y.dtype == np.float32 and layer.gamma.dtype == np.float32  # as Keras 3
    ref = BatchNormalization()(x16.astype(np.float32), training=True)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert layer.backward(np.ones_like(y)).dtype == np.float16

    mixed = BatchNormalization(dtype="mixed_float16")
    y = mixed(x16, training=True)
    assert y.dtype == np.float16 and mixed.moving_mean.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=2e-3, atol=2e-3)

    f64 = BatchNormalization(dtype="float64")
    assert f64(np.ones((2, 3), np.float32)).dtype == np.float64
    assert BatchNormalization()(np.ones((2, 3))).dtype == np.float32


def test_stability_large_mean_small_std_first_call():
    rng = np.random.default_rng(6)
    x = 1e4 + 1e-2 * rng.standard_normal((4096, 3))
    layer = BatchNormalization(momentum=0.0, dtype="float64")
    layer(x, training=True)
    var = layer.moving_variance.numpy()
    np.testing.assert_allclose(var, np.var(x, axis=0), rtol=1e-6)
    assert (var > 0).all()
    x32 = (1e3 + rng.standard_normal((4096, 3))).astype(np.float32)
    layer = BatchNormalization(momentum=0.0)
    layer(x32, training=True)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               np.var(x32.astype(np.float64), axis=0), rtol=1e-5)


def test_regularizers_losses_grads_and_constraints():
    layer = BatchNormalization(gamma_regularizer="l2", beta_regularizer=distbn.regularizers.L1(0.5),
                               gamma_constraint="non_neg", beta_constraint="max_norm",
                               dtype="float64")
    x = np.random.default_rng(7).normal(size=(5, 3))
    layer.build(x.shape)
    assert layer.losses == [pytest.approx(0.01 * 3), 0.0]
    layer.set_weights([np.array([1.0, 2.0, 3.0]), np.array([-1.0, 0.0, 2.0]),
                       np.zeros(3), np.ones(3)])
    y = layer(x, training=True)
    assert layer.losses == [pytest.approx(0.01 * 14), pytest.approx(0.5 * 3)]
    w = np.random.default_rng(8).normal(size=y.shape)
    layer.backward(w)
    xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)
    np.testing.assert_allclose(layer.gamma.grad, (w * xhat).sum(0) + 0.02 * np.array([1, 2, 3]))
    np.testing.assert_allclose(layer.beta.grad, w.sum(0) + 0.5 * np.array([-1, 0, 1]))
    assert isinstance(layer.gamma.constraint, distbn.constraints.NonNeg)
    assert isinstance(layer.beta.constraint, distbn.constraints.MaxNorm)
    assert layer.moving_mean.constraint is None and not layer.moving_mean.trainable


def test_get_set_weights_keras_order_and_shapes():
    layer = BatchNormalization(center=False)
    layer.build((None, 4))
    assert [v.name for v in layer.weights] == ["gamma", "moving_mean", "moving_variance"]
    assert [v.path for v in layer.trainable_weights] == [f"{layer.name}/gamma"]
    ws = [np.full(4, 2.0), np.full(4, 0.5), np.full(4, 3.0)]
    layer.set_weights(ws)
    for a, b in zip(layer.get_weights(), ws, strict=True):
        np.testing.assert_array_equal(a, b)
    assert layer.beta is None
    with pytest.raises(ValueError, match=r"'moving_mean'.*\(4,\).*\(5,\)"):
        layer.set_weights([np.ones(4), np.ones(5), np.ones(4)])
    with pytest.raises(ValueError, match="got 4"):
        layer.set_weights(ws + [np.ones(4)])
    full = BatchNormalization()
    full.build((2, 3, 5))
    assert [v.name for v in full.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert full.gamma.shape == (5,) and full.gamma.dtype == np.float32


def test_build_with_unknown_dims_and_tuple_axis_shapes():
    layer = BatchNormalization(axis=(1, -1))
    layer.build((None, 3, None, 2))
    assert layer.gamma.shape == (3, 2)
    y = layer(np.random.default_rng(9).normal(size=(4, 3, 7, 2)), training=True)
    assert y.shape == (4, 3, 7, 2)


KERAS_CONFIG = {
    "name": "batch_normalization", "trainable": True,
    "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
              "registered_name": None},
    "axis": 1, "momentum": 0.9, "epsilon": 0.001, "center": True, "scale": True,
    "beta_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                         "registered_name": None},
    "gamma_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {},
                          "registered_name": None},
    "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                "config": {}, "registered_name": None},
    "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones",
                                    "config": {}, "registered_name": None},
    "beta_regularizer": None,
    "gamma_regularizer": {"module": "keras.regularizers", "class_name": "L2",
                          "config": {"l2": 0.0001}, "registered_name": None},
    "beta_constraint": {"module": "keras.constraints", "class_name": "NonNeg", "config": {},
                        "registered_name": None},
    "gamma_constraint": None, "synchronized": False, "renorm": False,
    "renorm_clipping": None, "renorm_momentum": 0.99,
}


def test_from_keras_config():
    layer = BatchNormalization.from_config(json.loads(json.dumps(KERAS_CONFIG)))
    assert (layer.axis, layer.momentum, layer.epsilon) == (1, 0.9, 0.001)
    assert layer.dtype == "float32" and layer.name == "batch_normalization"
    assert isinstance(layer.gamma_regularizer, distbn.regularizers.L2)
    assert layer.gamma_regularizer.l2 == 1e-4
    assert isinstance(layer.beta_constraint, distbn.constraints.NonNeg)
    cfg = layer.get_config()
    for key, value in cfg.items():
        if key != "dtype":
            assert KERAS_CONFIG[key] == value, key
    wrapped = {"module": "keras.layers", "class_name": "BatchNormalization",
               "config": KERAS_CONFIG, "registered_name": None}
    assert BatchNormalization.from_config(wrapped).get_config() == cfg
    # renorm and virtual_batch_size load too (tests/test_renorm.py, test_ghost_bn.py)
    assert BatchNormalization.from_config({**KERAS_CONFIG, "renorm": True}).renorm


def test_config_json_round_trip():
    layer = BatchNormalization(axis=(1, 2), momentum=0.8, epsilon=1e-5, center=False,
                               gamma_initializer=distbn.initializers.RandomNormal(seed=3),
                               moving_variance_initializer="he_normal",
                               gamma_regularizer=distbn.regularizers.L1L2(0.1, 0.2),
                               gamma_constraint=distbn.constraints.MinMaxNorm(0.5, 2.0),
                               synchronized=True, name="bn_x", dtype="float64",
                               trainable=False)
    cfg = layer.get_config()
    again = BatchNormalization.from_config(json.loads(json.dumps(cfg)))
    assert again.get_config() == cfg
    assert again.axis == (1, 2) and again.trainable is False and again.dtype == "float64"
    mixed = BatchNormalization(dtype="mixed_float16")
    assert BatchNormalization.from_config(mixed.get_config()).compute_dtype == "float16"


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    ({"momentum": -0.1}, "momentum=-0.1"),
    ({"momentum": 1.5}, "momentum=1.5"),
    ({"epsilon": 0.0}, "epsilon=0.0"),
    ({"epsilon": -1e-3}, "epsilon=-0.001"),
    ({"axis": "last"}, "axis='last'"),
    ({"axis": (1, 1)}, r"axis=\(1, 1\)"),
    ({"center": "yes"}, "center='yes'"),
    ({"beta_initializer": "nonsense"}, "'nonsense'"),
    ({"gamma_regularizer": "l9"}, "'l9'"),
    ({"beta_constraint": "positive"}, "'positive'"),
    ({"gamma_regularizer": lambda v: 0.0}, "gradient"),
])
def test_invalid_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchNormalization(**kwargs)


def test_unknown_kwarg():
    with pytest.raises(TypeError, match="'fancy'"):
        BatchNormalization(fancy=True)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match=r"axis 3 .*rank 3.*\(2, 3, 4\)"):
        BatchNormalization(axis=3)(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="axis -4"):
        BatchNormalization(axis=-4).build((2, 3, 4))
    with pytest.raises(ValueError, match="twice"):
        BatchNormalization(axis=(1, -2)).build((2, 3, 4))
    with pytest.raises(ValueError, match="known size"):
        BatchNormalization().build((2, None))


def test_input_changes_after_build():
    layer = BatchNormalization()
    layer(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"rank 2 .*\(2, 3\).*rank 3 .*\(2, 3, 1\)"):
        layer(np.ones((2, 3, 1)))
    with pytest.raises(ValueError, match=r"3 channels .*\(2, 4\) with 4"):
        layer(np.ones((2, 4)))
    layer(np.ones((7, 3)))  # another batch size is fine


def test_bad_masks():
    layer = BatchNormalization()
    x = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"mask.shape=\(2, 3, 4\), inputs.shape=\(2, 3, 4\)"):
        layer(x, training=True, mask=np.ones((2, 3, 4), bool))
    with pytest.raises(ValueError, match=r"mask.shape=\(2, 5\), inputs.shape=\(2, 3, 4\)"):
        layer(x, training=True, mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="dtype"):
        layer(x, training=True, mask=np.full((2, 3), "a"))
    layer(x, training=True, mask=np.ones((2, 1), bool))  # broadcastable: accepted


def test_backward_errors():
    layer = BatchNormalization()
    with pytest.raises(RuntimeError, match="before the layer was called"):
        layer.backward(np.ones((2, 3)))
    layer(np.ones((2, 3)), training=True)
    with pytest.raises(ValueError, match=r"dy has shape \(3, 3\).*\(2, 3\)"):
        layer.backward(np.ones((3, 3)))


def test_integer_input_is_cast_to_the_compute_dtype():
    layer = BatchNormalization()
    y = layer(np.arange(12).reshape(4, 3), training=True)
    assert y.dtype == np.float32 and layer.backward(np.ones((4, 3))).dtype == np.float32


class _TwoReplicas(BatchNormalization):
    """Simulates a second replica through the reduction hooks (what a strategy plugs in)."""

    _replicas_in_sync = 2  # shift by the moving mean, as every replica must

    def __init__(self, other_x, other_dy, **kwargs):
        super().__init__(synchronized=True, **kwargs)
        self.other_x, self.other_dy, self.calls = other_x, other_dy, []

    def _reduce_stats(self, buffer):
        self.calls.append(("stats", buffer.shape))
        shift = self.moving_mean.value.astype(np.float64)  # the same K on both replicas
        red = self._reduction_axes
        other = distbn.ops.pack_moments(*distbn.ops.local_moments(self.other_x, red, shift))
        return buffer + other

    def _reduce_grad_sums(self, buffer):
        self.calls.append(("grads", buffer.shape))
        c = self._cache
        inv_std = distbn.ops.inverse_std(c.var, self.epsilon)
        return buffer + distbn.ops.backward_sums(self.other_dy, self.other_x, c.mean,
                                                 inv_std, self._reduction_axes)


@pytest.mark.parametrize("split", [0, 3, 7])
def test_reduction_hooks_give_the_concatenated_batch(split):
    """One packed buffer per pass, and the synchronized result equals one big batch."""
    rng = np.random.default_rng(10)
    x, dy = rng.normal(4.0, 2.0, (7, 2, 3)), rng.normal(size=(7, 2, 3))
    weights = [rng.normal(size=3), rng.normal(size=3), rng.normal(4.0, 0.1, 3), np.ones(3)]
    sync = _TwoReplicas(x[split:], dy[split:], momentum=0.5, dtype="float64")
    whole = BatchNormalization(momentum=0.5, dtype="float64")
    for layer in (sync, whole):
        layer.build(x.shape)
        layer.set_weights(weights)
    y_sync, y_whole = sync(x[:split], training=True), whole(x, training=True)
    dx_sync, dx_whole = sync.backward(dy[:split]), whole.backward(dy)
    assert sync.calls == [("stats", (3, 3)), ("grads", (2, 3))]
    np.testing.assert_allclose(y_sync, y_whole[:split], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx_sync, dx_whole[:split], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sync.moving_mean.numpy(), whole.moving_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(sync.moving_variance.numpy(), whole.moving_variance.numpy(),
                               rtol=1e-10)
    # gamma/beta gradients stay local sums (the strategy's gradient all-reduce adds them)
    np.testing.assert_allclose(sync.beta.grad, dy[:split].sum((0, 1)), atol=1e-12)
