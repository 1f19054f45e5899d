"""Batch renormalization (`renorm=True`): Keras 3 parity (JAX backend), exact backward,
config, validation, edge cases, and the trainer config path."""

import json
import os

import numpy as np
import pytest
from gradcheck import numeric_grad

from distbn import BatchNormalization

os.environ.setdefault("KERAS_BACKEND", "jax")


# --- Keras 3 parity ------------------------------------------------------------------------
def _keras():
    keras = pytest.importorskip("keras")
    pytest.importorskip("jax")
    if keras.backend.backend() != "jax":
        pytest.skip("needs KERAS_BACKEND=jax")
    return keras


def _scaled(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 0.0 if a.size == 0 else float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def _keras_step(layer, x, mask, training, w):
    """Output, new non-trainable weights and (trainable, x) gradients of one Keras call."""
    import jax

    def f(tv, x):
        x = x.astype(layer.compute_dtype)
        return layer.stateless_call(tv, ntv, x, training=training, mask=mask)

    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]
    (out, new_ntv), pullback = jax.vjp(f, tv, x)
    g_tv, g_x = pullback((w, [jax.numpy.zeros_like(v) for v in new_ntv]))
    return out, new_ntv, g_tv, g_x


CLIPPINGS = [None, {}, {"rmax": 1.2}, {"rmin": 0.9, "rmax": 1.1, "dmax": 0.3},
             {"dmax": 0.0}, {"rmin": 0.5}]


def _case(seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(2, 4))
    shape = (int(rng.integers(3, 9)),) + tuple(int(d) for d in rng.integers(1, 5, ndim - 1))
    axis = int(rng.integers(-ndim, ndim))
    shape = tuple(max(d, 2) if a == axis % ndim else d for a, d in enumerate(shape))
    return dict(
        shape=shape, axis=axis,  # >= 2 channels: Keras' masked moments squeeze C = 1
        policy="mixed_float16" if seed % 5 == 4 else "float32",
        in_dtype="float16" if seed % 4 == 3 else "float32",
        momentum=float(rng.choice([0.0, 0.5, 0.9])),
        renorm_momentum=float(rng.choice([0.0, 0.6, 0.9, 0.99])),
        epsilon=float(rng.choice([1e-3, 1e-2])),
        center=bool(seed % 3 != 1), scale=bool(seed % 7 != 2),
        clipping=CLIPPINGS[seed % len(CLIPPINGS)],
        masked=bool(seed % 2), loc=float(rng.choice([0.0, 2.0])),
    )


def _mask(rng, shape, axis):
    """Every channel keeps >= 2 unmasked positions (Keras divides by n + 1e-7)."""
    axis = axis % len(shape)
    red = tuple(a for a in range(len(shape)) if a != axis)
    for _ in range(100):
        mask = rng.random(shape[:-1]) < 0.7
        if (np.broadcast_to(mask[..., None], shape).sum(red) >= 2).all():
            return mask
    return np.ones(shape[:-1], bool)


@pytest.mark.parametrize("seed", range(6))
def test_renorm_matches_keras_over_successive_calls(seed):
    keras = _keras()
    c = _case(seed)
    rng = np.random.default_rng(100 + seed)
    kw = dict(axis=c["axis"], momentum=c["momentum"], epsilon=c["epsilon"],
              center=c["center"], scale=c["scale"], dtype=c["policy"], renorm=True,
              renorm_clipping=c["clipping"], renorm_momentum=c["renorm_momentum"])
    kl = keras.layers.BatchNormalization(**kw)
    dl = BatchNormalization(**kw)
    kl.build(c["shape"])
    dl.build(c["shape"])
    assert [v.path for v in kl.weights] == [v.path.replace(dl.name, kl.name) for v in dl.weights]
    for kv, dv in zip(kl.weights, dl.weights, strict=True):  # Keras' initial values
        np.testing.assert_allclose(dv.numpy(), np.asarray(kv.value), rtol=1e-7)
    p = dl.moving_mean.shape
    ws = [w.astype(np.float32) for w in
          ([rng.normal(1.0, 0.3, p)] if c["scale"] else [])
          + ([rng.normal(0.0, 0.3, p)] if c["center"] else [])
          + [rng.normal(c["loc"], 0.5, p), rng.random(p) + 0.5]]
    # moving_stddev, renorm_mean, renorm_stddev (Keras' order)
    ws += [rng.random(p) + 0.7, rng.normal(c["loc"], 0.5, p), rng.random(p) + 0.7]
    kl.set_weights([w.astype(np.float32) for w in ws])
    dl.set_weights([w.astype(np.float32) for w in ws])
    schedule = [True, True, False, True, None]
    out_kind = "float16" if c["policy"] == "mixed_float16" else "float32"
    tol = 2e-3 if (out_kind == "float16" or c["in_dtype"] == "float16") else 3e-5
    gtol = 2e-3 if tol > 1e-4 else 1e-4
    for call, training in enumerate(schedule):
        x = rng.normal(c["loc"], 2.0, c["shape"]).astype(c["in_dtype"])
        mask = _mask(rng, c["shape"], c["axis"]) if c["masked"] else None
        w = rng.normal(size=c["shape"]).astype(out_kind)
        k_out, k_ntv, k_gtv, k_gx = _keras_step(kl, x, mask, training, w)
        for var, value in zip(kl.non_trainable_variables, k_ntv, strict=True):
            var.assign(value)
        d_out = dl(x, training=training, mask=mask)
        d_gx = dl.backward(w)
        assert d_out.dtype == np.asarray(k_out).dtype
        assert _scaled(d_out, k_out) <= tol, (call, _scaled(d_out, k_out))
        for kv, dv in zip(kl.weights, dl.weights, strict=True):
            np.testing.assert_allclose(dv.numpy(), np.asarray(kv.value), rtol=1e-5,
                                       atol=2e-6, err_msg=f"{dv.name} after call {call}")
        assert d_gx.dtype == np.asarray(k_gx).dtype
        assert _scaled(d_gx, k_gx) <= gtol, ("dx", call, _scaled(d_gx, k_gx))
        params = [v for v in (dl.gamma, dl.beta) if v is not None]
        for dv, kg in zip(params, k_gtv, strict=True):
            assert _scaled(dv.grad, kg) <= gtol, (dv.name, call, _scaled(dv.grad, kg))


KERAS_MADE = [
    dict(renorm=True),
    dict(renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
         renorm_momentum=0.9, axis=1, momentum=0.8),
    dict(renorm=True, renorm_clipping={"dmax": 1.0}, scale=False,
         moving_variance_initializer="ones"),
]


@pytest.mark.parametrize("kwargs", KERAS_MADE, ids=range(len(KERAS_MADE)))
def test_keras_made_renorm_config_loads_and_round_trips(kwargs):
    keras = _keras()
    kl = keras.layers.BatchNormalization(**kwargs)
    cfg = json.loads(json.dumps(kl.get_config()))
    dl = BatchNormalization.from_config(cfg)
    mine = dl.get_config()
    assert set(mine) == set(cfg)
    for key, value in mine.items():
        if key != "dtype":
            assert cfg[key] == value, key
    assert BatchNormalization.from_config(json.loads(json.dumps(mine))).get_config() == mine
    back = keras.layers.BatchNormalization.from_config(json.loads(json.dumps(mine)))
    assert back.get_config() == {**cfg, "dtype": back.get_config()["dtype"]}
    kl.build((5, 3, 4))
    dl.build((5, 3, 4))
    assert [v.name for v in kl.weights] == [v.name for v in dl.weights]


# --- exact backward, float64 ---------------------------------------------------------------
def _loss_fn(layer, x, w, saved, **kw):
    """sum(w * layer(x)) from the same weights every time (each call updates the stats)."""
    def f():
        layer.set_weights(saved)
        return float(np.sum(w * layer(x, training=True, **kw)))
    return f


@pytest.mark.parametrize("axis,shape,clip", [
    (-1, (6, 3), None), (1, (4, 3, 2), {"rmax": 1.05, "dmax": 0.1}), (-1, (3, 2, 4), {})])
def test_backward_matches_central_differences_with_r_d_constant(axis, shape, clip):
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, shape)
    w = rng.normal(size=shape)
    bn = BatchNormalization(axis=axis, renorm=True, renorm_clipping=clip, dtype="float64",
                            momentum=0.5, renorm_momentum=0.7)
    bn.build(shape)
    p = bn.gamma.shape
    saved = [rng.normal(1, .3, p), rng.normal(0, .3, p), rng.normal(1, .3, p),
             rng.random(p) + .5, rng.random(p) + .5, rng.normal(1, .5, p), rng.random(p) + .5]
    bn.set_weights(saved)
    bn(x, training=True)
    dx = bn.backward(w)
    g_gamma, g_beta = bn.gamma.grad.copy(), bn.beta.grad.copy()
    r, d = bn._cache.renorm_r, bn._cache.renorm_d
    red = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    gamma = np.expand_dims(saved[0], red)
    beta = np.expand_dims(saved[1], red)
    re, de = np.expand_dims(r, red), np.expand_dims(d, red)

    def frozen():  # the same forward with r and d held fixed: what stop_gradient means
        mu = x.mean(red, keepdims=True)
        var = x.var(red, keepdims=True)
        xhat = (x - mu) / np.sqrt(var + bn.epsilon)
        return float(np.sum(w * ((xhat * re + de) * gamma + beta)))

    np.testing.assert_allclose(dx, numeric_grad(frozen, x), rtol=1e-6, atol=1e-8)
    # gamma and beta do not enter r and d: central differences through the layer itself
    gam = saved[0].copy()
    saved[0] = gam

    def via_layer():
        bn.set_weights(saved)
        return float(np.sum(w * bn(x, training=True)))

    np.testing.assert_allclose(g_gamma, numeric_grad(via_layer, gam), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g_beta, numeric_grad(via_layer, saved[1]), rtol=1e-6,
                               atol=1e-8)


def test_backward_is_the_full_derivative_where_both_corrections_are_clipped():
    """With r and d both at their bounds they are locally constant: the layer's whole
    forward (moments included) is then differentiated exactly by backward()."""
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 3.0, (7, 4))
    w = rng.normal(size=x.shape)
    bn = BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 1.05,
                                                          "dmax": 0.2}, dtype="float64")
    bn.build(x.shape)
    saved = bn.get_weights()
    bn(x, training=True)
    r = bn._cache.renorm_r
    assert np.all((r == 1.1) | (r == 1.05)) and np.all(np.abs(bn._cache.renorm_d) == 0.2)
    dx = bn.backward(w)
    np.testing.assert_allclose(dx, numeric_grad(_loss_fn(bn, x, w, saved), x), rtol=1e-6,
                               atol=1e-8)


def test_r1_d0_clipping_is_plain_batch_norm():
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 1.5, (9, 2, 3))
    w = rng.normal(size=x.shape)
    rn = BatchNormalization(axis=1, renorm=True, dtype="float64",
                            renorm_clipping={"rmin": 1.0, "rmax": 1.0, "dmax": 0.0})
    bn = BatchNormalization(axis=1, dtype="float64")
    for mask in (None, rng.random(x.shape[:-1]) < 0.6):
        y1, y2 = rn(x, training=True, mask=mask), bn(x, training=True, mask=mask)
        np.testing.assert_allclose(y1, y2, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(rn.backward(w), bn.backward(w), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rn.gamma.grad, bn.gamma.grad, rtol=1e-12)
        np.testing.assert_allclose(rn.beta.grad, bn.beta.grad, rtol=1e-12)
        np.testing.assert_allclose(rn.moving_mean.numpy(), bn.moving_mean.numpy(), rtol=1e-13)


def test_float64_update_formulas_and_inference():
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, (10, 3))
    bn = BatchNormalization(renorm=True, dtype="float64", momentum=0.6, renorm_momentum=0.3,
                            epsilon=1e-2)
    bn(x, training=True)
    mu, s = x.mean(0), np.sqrt(x.var(0) + 1e-2)
    r, d = s / 1.0, (mu - 0.0) / 1.0
    y = (x - mu) / s * r + d
    bn2 = BatchNormalization(renorm=True, dtype="float64", momentum=0.6,
                             renorm_momentum=0.3, epsilon=1e-2)
    np.testing.assert_allclose(bn2(x, training=True), y, rtol=1e-12)
    np.testing.assert_allclose(bn.renorm_mean.numpy(), 0.7 * mu, rtol=1e-13)
    np.testing.assert_allclose(bn.renorm_stddev.numpy(), 0.3 + 0.7 * s, rtol=1e-13)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.4 * mu, rtol=1e-13)
    ms = 0.6 + 0.4 * s
    np.testing.assert_allclose(bn.moving_stddev.numpy(), ms, rtol=1e-13)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.maximum(ms**2 - 1e-2, 0),
                               rtol=1e-13)
    before = [v.copy() for v in bn.get_weights()]
    out = bn(x, training=False)
    np.testing.assert_allclose(out, (x - 0.4 * mu) / np.sqrt(ms**2 - 1e-2 + 1e-2), rtol=1e-12)
    for a, b in zip(before, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_empty_batch_and_empty_channel_keep_every_statistic():
    bn = BatchNormalization(renorm=True, dtype="float64")
    bn.build((None, 2))
    before = [v.copy() for v in bn.get_weights()]
    y = bn(np.zeros((0, 2)), training=True)
    assert y.shape == (0, 2)
    for a, b in zip(before, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # a channel whose positions are all masked: normalised with the moving statistics
    bn = BatchNormalization(axis=1, renorm=True, dtype="float64")
    x = np.random.default_rng(0).normal(size=(4, 2, 3))
    mask = np.ones((4, 2), bool)
    mask[:, 1] = False
    bn.build(x.shape)
    before = [v.copy() for v in bn.get_weights()]
    bn(x, training=True, mask=mask)
    for a, b in zip(before, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a[1], b[1])
        assert np.all(np.isfinite(b))


def test_frozen_layer_runs_inference_and_updates_nothing():
    bn = BatchNormalization(renorm=True, trainable=False)
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    bn.build(x.shape)
    before = [v.copy() for v in bn.get_weights()]
    np.testing.assert_allclose(bn(x, training=True), x / np.sqrt(1 + 1e-3), rtol=1e-6)
    for a, b in zip(before, bn.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# --- config and validation ---------------------------------------------------------------
def test_config_round_trip_and_keras_defaults():
    bn = BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0}, renorm_momentum=0.5)
    cfg = json.loads(json.dumps(bn.get_config()))
    assert (cfg["renorm"], cfg["renorm_clipping"], cfg["renorm_momentum"]) == \
        (True, {"rmax": 2.0}, 0.5)
    assert BatchNormalization.from_config(cfg).get_config() == cfg
    assert BatchNormalization(renorm=True).get_config()["renorm_clipping"] == {}
    plain = BatchNormalization().get_config()
    assert (plain["renorm"], plain["renorm_clipping"], plain["renorm_momentum"]) == \
        (False, None, 0.99)
    assert "virtual_batch_size" not in plain


@pytest.mark.parametrize("clip,message", [
    ({"rmax": 1.0, "bogus": 2}, r"invalid keys for `renorm_clipping`.*bogus.*\['rmax', "
                                r"'rmin', 'dmax'\]"),
    ({"rmax": 0.5, "rmin": 2.0}, r"rmax should be greater than rmin.*rmax=0.5, rmin=2.0"),
    ({"dmax": -1.0}, r"dmax should be non-negative.*dmax=-1.0"),
    ({"rmax": "big"}, r"renorm_clipping\['rmax'\].*'big'"),
    ([1.0], r"renorm_clipping=\[1.0\]"),
])
def test_renorm_clipping_validation(clip, message):
    with pytest.raises(ValueError, match=message):
        BatchNormalization(renorm=True, renorm_clipping=clip)


def test_renorm_momentum_and_flag_validation():
    with pytest.raises(ValueError, match="renorm_momentum=1.5"):
        BatchNormalization(renorm=True, renorm_momentum=1.5)
    with pytest.raises(ValueError, match="renorm='yes'"):
        BatchNormalization(renorm="yes")
    # as Keras: clipping is not validated while renorm is off
    assert BatchNormalization(renorm_clipping={"x": 1}).renorm_clipping == {"x": 1}


def test_trainer_config_passes_renorm_arguments_through():
    from distbn.train import builder
    from distbn.train.config import parse_config

    text = """
seed: 0
data: {name: patterns, n_train: 64, n_test: 16}
model:
  dtype: float64
  synchronized: false
  layers:
    - {type: Dense, units: 3}
    - {type: BatchNormalization, renorm: true, renorm_momentum: 0.9,
       renorm_clipping: {rmax: 3.0, rmin: 0.3, dmax: 5.0}}
    - {type: BatchNormalization, virtual_batch_size: 4}
    - {type: Dense, units: 10}
train: {global_batch_size: 8, steps: 1}
"""
    cfg = parse_config(text, source="renorm.yaml")
    spec = cfg.model.layers[1]
    cls, kwargs = builder.layer_kwargs(spec, cfg.model)
    layer = cls(**kwargs)
    assert layer.renorm and layer.renorm_momentum == 0.9
    assert layer.renorm_clipping == {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}
    assert "renorm" in (BatchNormalization.__doc__ or "")
    cls, kwargs = builder.layer_kwargs(cfg.model.layers[2], cfg.model)
    assert cls(**kwargs).virtual_batch_size == 4
