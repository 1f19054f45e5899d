"""Parity with Keras 3 (jax backend): outputs, moving statistics, gradients, dtypes, configs.

Runs in `make test` and CI (the Makefile installs the `keras` extra: keras and jax);
skipped in an environment without them.
"""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")
jax = pytest.importorskip("jax")
if keras.backend.backend() != "jax":
    pytest.skip("the parity test needs KERAS_BACKEND=jax", allow_module_level=True)

import distbn  # noqa: E402

N_CASES = 24  # random cases (the suite's time budget; every branch is drawn)
# Tolerances, relative to the largest magnitude of the reference (float32 rounding).
TOL = {"float32": 2e-5, "float16": 2e-3}
STATS_RTOL = 1e-5
GRAD_TOL = {"float32": 1e-4, "float16": 2e-3}
MAX_SEEN = {}  # largest scaled difference per quantity, printed at the end


def _scaled_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def _check(what, a, b, tol):
    d = _scaled_diff(a, b)
    MAX_SEEN[what] = max(MAX_SEEN.get(what, 0.0), d)
    assert d <= tol, f"{what}: scaled max difference {d:.3g} > {tol}"


def _case(seed):
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(2, 5))
    shape = tuple(int(d) for d in rng.integers(1, 6, ndim))
    shape = (int(rng.integers(2, 9)),) + shape[1:]
    axis = int(rng.integers(-ndim, ndim))
    policy = "mixed_float16" if rng.random() < 0.15 else "float32"
    return dict(
        shape=shape, axis=axis, policy=policy,
        momentum=float(rng.choice([0.0, 0.5, 0.9, 0.99])),
        epsilon=float(rng.choice([1e-3, 1e-5, 0.1])),
        center=bool(rng.random() < 0.8), scale=bool(rng.random() < 0.8),
        training=[None, False, True, True][int(rng.integers(4))],
        trainable=bool(rng.random() < 0.85),
        masked=bool(rng.random() < 0.5),
        in_dtype="float16" if rng.random() < 0.25 else "float32",
        calls=int(rng.integers(1, 4)),
        loc=float(rng.choice([0.0, 3.0, 50.0])),
    )


def _keras_vjp(layer, x, mask, training, w):
    """Output, new moving stats and gradients (variables, x) of a stateless Keras call.

    `stateless_call` skips `Layer.__call__`'s input autocast, so it is done here, inside
    the differentiated function, as `__call__` would. Jitted: one compile per case is
    much faster than eager jax's per-op dispatch.
    """
    def run(tv, ntv, x, mask, w):
        def f(tv, x):
            x = x.astype(layer.compute_dtype)
            return layer.stateless_call(tv, ntv, x, training=training, mask=mask)

        (out, new_ntv), pullback = jax.vjp(f, tv, x)
        g_tv, g_x = pullback((w, [jax.numpy.zeros_like(v) for v in new_ntv]))
        return out, new_ntv, g_tv, g_x

    tv = [v.value for v in layer.trainable_variables]
    ntv = [v.value for v in layer.non_trainable_variables]
    return jax.jit(run)(tv, ntv, x, mask, w)


def _mask(rng, shape, axis):
    """A random mask leaving every channel two unmasked positions where it has two.

    An empty channel is where distbn deliberately differs (it keeps the moving
    statistics); a channel of one position has variance ~0, where Keras' 1e-7 in the
    masked mean's denominator dominates the gradient (1/sqrt(eps)^3 amplification).
    """
    axis = axis % len(shape)
    red = tuple(a for a in range(len(shape)) if a != axis)
    per_channel = np.prod([shape[a] for a in red])
    for _ in range(100):
        mask = rng.random(shape[:-1]) < 0.7
        counts = np.broadcast_to(mask[..., None], shape).sum(red)
        if (counts >= min(2, per_channel)).all():
            return mask
    return np.ones(shape[:-1], bool)


@pytest.mark.parametrize("seed", range(N_CASES))
def test_random_case_matches_keras(seed):
    c = _case(seed)
    rng = np.random.default_rng(1000 + seed)
    kw = dict(axis=c["axis"], momentum=c["momentum"], epsilon=c["epsilon"],
              center=c["center"], scale=c["scale"], dtype=c["policy"])
    kl = keras.layers.BatchNormalization(**kw)
    dl = distbn.BatchNormalization(**kw)
    kl.build(c["shape"])
    dl.build(c["shape"])
    pshape = dl.moving_mean.shape
    weights = ([rng.normal(1.0, 0.5, pshape)] if c["scale"] else []) + \
              ([rng.normal(0.0, 0.5, pshape)] if c["center"] else []) + \
              [rng.normal(c["loc"], 1.0, pshape), rng.random(pshape) * 3 + 0.1]
    weights = [w.astype(np.float32) for w in weights]
    kl.set_weights(weights)
    dl.set_weights(weights)
    kl.trainable = dl.trainable = c["trainable"]
    assert [v.path for v in kl.weights] == [v.path.replace(dl.name, kl.name) for v in dl.weights]

    for call in range(c["calls"]):
        shape = (c["shape"][0] + call,) + c["shape"][1:] if c["axis"] % len(c["shape"]) \
            else c["shape"]
        x = rng.normal(c["loc"], 2.0, shape).astype(c["in_dtype"])
        mask = None
        if c["masked"]:
            mask = _mask(rng, shape, c["axis"])
        # the cotangent has the output's dtype (float16 under mixed_float16)
        w = rng.normal(size=shape).astype("float16" if c["policy"] == "mixed_float16"
                                          else "float32")

        k_out, k_ntv, k_gtv, k_gx = _keras_vjp(kl, x, mask, c["training"], w)
        for var, value in zip(kl.non_trainable_variables, k_ntv, strict=True):
            var.assign(value)
        d_out = dl(x, training=c["training"], mask=mask)
        d_gx = dl.backward(w)

        k_out = np.asarray(k_out)
        assert d_out.dtype == k_out.dtype, (d_out.dtype, k_out.dtype)
        out_kind = "float16" if k_out.dtype == np.float16 else "float32"
        _check(f"output[{out_kind}]", d_out, k_out, TOL[out_kind])
        for kv, dv in zip(kl.weights, dl.weights, strict=True):
            np.testing.assert_allclose(dv.numpy(), np.asarray(kv.value), rtol=STATS_RTOL,
                                       atol=1e-6, err_msg=dv.name)
            _check("moving stats", dv.numpy(), np.asarray(kv.value), STATS_RTOL)
        k_gx = np.asarray(k_gx)
        assert d_gx.dtype == k_gx.dtype
        # under mixed_float16 the input gradient passes through float16 too
        gx_kind = "float16" if np.float16 in (k_gx.dtype, k_out.dtype) else "float32"
        _check(f"dx[{gx_kind}]", d_gx, k_gx, GRAD_TOL[gx_kind])
        if c["trainable"]:
            d_params = [v for v in (dl.gamma, dl.beta) if v is not None]
            assert len(d_params) == len(k_gtv)
            for dv, kg in zip(d_params, k_gtv, strict=True):
                _check(f"d{dv.name}", dv.grad, np.asarray(kg), GRAD_TOL["float32"])


def test_float16_output_dtype_as_keras():
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float16)
    for policy in ("float32", "mixed_float16"):
        for in_dtype in ("float16", "float32"):
            k = keras.layers.BatchNormalization(dtype=policy)(x.astype(in_dtype), training=True)
            d = distbn.BatchNormalization(dtype=policy)(x.astype(in_dtype), training=True)
            assert np.asarray(k).dtype == d.dtype, (policy, in_dtype)
            _check(f"output[{d.dtype}]", d, np.asarray(k), TOL[str(d.dtype)])


KERAS_MADE = [
    dict(),
    dict(axis=1, momentum=0.9, epsilon=1e-5, center=False),
    dict(axis=-2, scale=False, beta_initializer="random_normal",
         gamma_initializer=keras.initializers.HeNormal(seed=3),
         moving_variance_initializer=keras.initializers.Constant(2.0)),
    dict(gamma_regularizer=keras.regularizers.L2(1e-4), beta_regularizer="l1",
         beta_constraint="non_neg", gamma_constraint=keras.constraints.MaxNorm(3, axis=0)),
    dict(gamma_regularizer=keras.regularizers.L1L2(l1=0.1, l2=0.2),
         gamma_constraint=keras.constraints.MinMaxNorm(0.5, 2.0, rate=0.5),
         beta_constraint=keras.constraints.UnitNorm(), trainable=False, name="frozen_bn"),
    dict(dtype="mixed_float16", moving_mean_initializer="glorot_uniform"),
]


def _without_unset_axes(obj):
    """distbn writes the initializers' fan axes only when set (older Keras rejects them)."""
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        inner = {k: v for k, v in obj["config"].items()
                 if not (k in ("input_axes", "output_axes") and v is None)}
        return {**obj, "config": inner}
    return obj


@pytest.mark.parametrize("kwargs", KERAS_MADE, ids=range(len(KERAS_MADE)))
def test_keras_made_config_loads_into_equivalent_layer(kwargs):
    kl = keras.layers.BatchNormalization(**kwargs)
    cfg = json.loads(json.dumps(kl.get_config()))
    dl = distbn.BatchNormalization.from_config(cfg)
    mine = dl.get_config()
    for key, value in mine.items():
        if key == "dtype":
            assert value == cfg["dtype"]["config"]["name"]
        else:
            assert _without_unset_axes(cfg[key]) == value, key
    assert set(cfg) - set(mine) <= {"renorm", "renorm_clipping", "renorm_momentum"}
    # and back: Keras accepts distbn's config
    back = keras.layers.BatchNormalization.from_config(json.loads(json.dumps(mine)))
    assert back.get_config() == {**cfg, "dtype": back.get_config()["dtype"]}
    assert back.dtype_policy.name == kl.dtype_policy.name
    # same behaviour once given the same weights
    shape = (6, 4, 3)
    kl.build(shape)
    dl.build(shape)
    assert [v.shape for v in kl.weights] == [v.shape for v in dl.weights]
    rng = np.random.default_rng(1)
    ws = [rng.random(v.shape).astype(np.float32) + 0.5 for v in dl.weights]
    kl.set_weights(ws)
    dl.set_weights(ws)
    x = rng.normal(size=shape).astype(np.float32)
    for training in (False, True):
        _check("config-made output", dl(x, training=training),
               np.asarray(kl(x, training=training)), TOL["float16"])
    if cfg.get("gamma_regularizer") or cfg.get("beta_regularizer"):
        np.testing.assert_allclose(sorted(dl.losses), sorted(float(v) for v in kl.losses),
                                   rtol=1e-6)
    for kc, dc in ((kl.beta_constraint, dl.beta_constraint),
                   (kl.gamma_constraint, dl.gamma_constraint)):
        if kc is not None:
            v = rng.normal(size=(3,)).astype(np.float32)
            np.testing.assert_allclose(dc(v), np.asarray(kc(v)), rtol=1e-6, atol=1e-7)


def test_report_max_differences(capsys):
    """Not a check: prints the largest scaled differences the cases above produced."""
    with capsys.disabled():
        print("\nkeras parity, max scaled |distbn - keras| / max|keras|:")
        for k, v in sorted(MAX_SEEN.items()):
            print(f"  {k:22s} {v:.3g}")
