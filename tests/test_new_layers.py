"""LayerNormalization, GroupNormalization, Conv1D, GlobalAveragePooling1D, Add, Concatenate:
float64 gradient checks, parity with Keras 3 (jax backend) on random cases, configs, errors.

The Keras reference runs one jitted function per layer type (all of that type's cases in
one compile): eager jax compiles every op of every case and is several times slower.
"""

import json
import os
import warnings

import numpy as np
import pytest
from gradcheck import numeric_grad

import distbn
import distbn.layers as L

RNG = np.random.default_rng(18)


# --- gradient checks (float64, central differences) ----------------------------------------
def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_grads(layer, xs, mask=None, rtol=1e-6, atol=1e-8):
    """Input and weight gradients of `sum(layer(xs) * proj) + penalties` against
    central differences. `xs` is an array or (multi-input layers) a list of arrays."""
    multi = isinstance(xs, list)
    xs = [np.array(x, dtype=np.float64) for x in _as_list(xs)]
    arg = xs if multi else xs[0]
    kw = {} if mask is None else {"mask": mask}
    proj = RNG.standard_normal(layer(arg, training=True, **kw).shape)

    def loss():
        return (float(np.sum(layer(arg, training=True, **kw) * proj))
                + sum(layer.regularization_losses()))

    layer(arg, training=True, **kw)
    dxs = _as_list(layer.backward(proj)) if multi else [layer.backward(proj)]
    analytic = {w.path: w.grad.copy() for w in layer.trainable_weights}
    assert len(dxs) == len(xs)
    for dx, x in zip(dxs, xs, strict=True):
        assert dx.shape == x.shape
        np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=rtol, atol=atol)
    for w in layer.trainable_weights:
        np.testing.assert_allclose(analytic[w.path], numeric_grad(loss, w.value),
                                   rtol=rtol, atol=atol, err_msg=w.path)


def _randomize(layer):
    """Random (non-default) weights, so gamma/beta/bias are exercised."""
    for w in layer.weights:
        base = 1.0 if w.name == "gamma" else 0.0
        w.assign(RNG.normal(base, 0.5, w.shape))
    return layer


F64 = dict(dtype="float64")
GRAD_CASES = [
    (lambda: L.LayerNormalization(**F64), (3, 5)),
    (lambda: L.LayerNormalization(axis=[1, 2], gamma_regularizer="l2", **F64), (2, 3, 4)),
    (lambda: L.LayerNormalization(axis=[-1, -3], center=False, epsilon=0.1, **F64),
     (2, 3, 2, 3)),
    (lambda: L.LayerNormalization(axis=1, scale=False, **F64), (2, 4, 3)),
    (lambda: L.LayerNormalization(rms_scaling=True, **F64), (3, 6)),
    (lambda: L.GroupNormalization(groups=2, beta_regularizer="l1", **F64), (2, 3, 4)),
    (lambda: L.GroupNormalization(groups=3, axis=1, **F64), (2, 6, 2, 2)),
    (lambda: L.GroupNormalization(groups=-1, center=False, **F64), (2, 4, 3)),
    (lambda: L.GroupNormalization(groups=1, axis=-2, scale=False, **F64), (2, 4, 2)),
    (lambda: L.Conv1D(3, 3, kernel_regularizer="l2", **F64), (2, 6, 2)),
    (lambda: L.Conv1D(4, 3, strides=2, padding="same", groups=2, **F64), (2, 7, 4)),
    (lambda: L.Conv1D(2, 2, padding="causal", dilation_rate=2, activation="tanh", **F64),
     (1, 6, 3)),
    (lambda: L.Conv1D(6, 3, padding="causal", strides=2, groups=3,
                      data_format="channels_first", **F64), (2, 3, 5)),
    (lambda: L.GlobalAveragePooling1D(**F64), (3, 4, 2)),
    (lambda: L.GlobalAveragePooling1D(data_format="channels_first", keepdims=True, **F64),
     (2, 3, 4)),
]


@pytest.mark.filterwarnings("ignore:LayerNormalization. rms_scaling")
@pytest.mark.parametrize("make,shape", GRAD_CASES, ids=range(len(GRAD_CASES)))
def test_gradients(make, shape):
    check_grads(_randomize(make()), RNG.normal(0.5, 1.0, shape))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_global_average_pooling_1d_mask_gradients(data_format):
    layer = L.GlobalAveragePooling1D(data_format=data_format, dtype="float64")
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    shape = (3, 5, 2) if data_format == "channels_last" else (3, 2, 5)
    x = RNG.standard_normal(shape)
    check_grads(layer, x, mask=mask)
    y = layer(x, mask=mask)
    np.testing.assert_array_equal(y[1], 0)  # all masked: zeros, not Keras' NaN
    steps = 1 if data_format == "channels_last" else 2
    np.testing.assert_allclose(y[0], np.take(x[0], [0, 2, 3], axis=steps - 1).mean(steps - 1))


@pytest.mark.parametrize("make,shapes", [
    (lambda: L.Add(**F64), [(2, 3), (2, 3)]),
    (lambda: L.Add(**F64), [(2, 3, 4), (2, 1, 4), (2, 3, 1), (2, 4)]),
    (lambda: L.Concatenate(**F64), [(2, 3), (2, 1), (2, 2)]),
    (lambda: L.Concatenate(axis=1, **F64), [(2, 1, 3), (2, 2, 3)]),
])
def test_merge_gradients(make, shapes):
    check_grads(make(), [RNG.standard_normal(s) for s in shapes])


def test_statistics_are_per_sample():
    # Why no synchronization is needed: shards of a batch give the rows of the whole.
    x = RNG.standard_normal((6, 4, 6))
    for make in (lambda: L.LayerNormalization(axis=[1, 2], dtype="float64"),
                 lambda: L.GroupNormalization(groups=3, dtype="float64")):
        layer = make()
        whole = layer(x)
        np.testing.assert_allclose(np.concatenate([layer(x[:1]), layer(x[1:4]), layer(x[4:])]),
                                   whole, rtol=1e-14, atol=1e-14)


EMPTY_CASES = [
    (lambda: L.LayerNormalization(), (3, 4, 5)),
    (lambda: L.GroupNormalization(groups=2), (3, 4, 6)),
    (lambda: L.Conv1D(2, 3, padding="causal", groups=2), (3, 6, 4)),
    (lambda: L.GlobalAveragePooling1D(), (3, 6, 4)),
]


@pytest.mark.parametrize("make,shape", EMPTY_CASES, ids=range(len(EMPTY_CASES)))
def test_empty_local_batch(make, shape):
    # A rank may hold no rows of a global batch.
    layer = make()
    layer(np.ones(shape), training=True)
    y = layer(np.ones((0,) + shape[1:]), training=True)
    assert y.shape[0] == 0
    assert layer.backward(np.zeros(y.shape)).shape == (0,) + shape[1:]
    for w in layer.trainable_weights:
        assert w.grad.shape == w.shape and not np.any(w.grad)
    merged = L.Concatenate()([np.ones((0, 2)), np.ones((0, 3))])
    assert merged.shape == (0, 5)


def test_merge_contract():
    add, cat = L.Add(), L.Concatenate(axis=1)
    assert add.multi_input and cat.multi_input and not L.Dense(2).multi_input
    shapes = [(None, 3, 4), (None, 1, 4)]
    assert add.compute_output_shape(shapes) == (None, 3, 4)
    assert cat.compute_output_shape(shapes) == (None, 4, 4)
    assert cat.compute_output_shape([(None, None, 4), (None, 1, 4)]) == (None, None, 4)
    add.build(shapes)
    assert add.built and add.weights == []
    a, b = np.ones((2, 3, 4), np.float32), np.ones((2, 1, 4), np.float32)
    y = cat([a, b], training=True, mask=None)
    assert y.shape == (2, 4, 4) and y.dtype == np.float32
    grads = cat.backward(np.arange(32.0).reshape(2, 4, 4))
    assert isinstance(grads, list) and [g.shape for g in grads] == [a.shape, b.shape]
    np.testing.assert_array_equal(grads[1][:, 0], np.arange(32.0).reshape(2, 4, 4)[:, 3])


def _suffix(name: str) -> int:
    head, _, tail = name.rpartition("_")
    return int(tail) if head and tail.isdigit() else 0


def test_conv1d_does_not_take_automatic_names():
    before = L.Conv2D(1, 1).name
    layer = L.Conv1D(2, 3, groups=2)
    layer(np.ones((1, 4, 2)))
    assert _suffix(L.Conv2D(1, 1).name) == _suffix(before) + 1
    assert [w.path for w in layer.weights] == [f"{layer.name}/kernel", f"{layer.name}/bias"]


# --- errors quote the bad value -------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="axis='x'"):
        L.LayerNormalization(axis="x")
    with pytest.raises(ValueError, match="axis 3 is out of range"):
        L.LayerNormalization(axis=[1, 3])(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="batch axis"):
        L.LayerNormalization(axis=[0, 1])(np.ones((2, 3)))
    with pytest.raises(ValueError, match="same axis twice"):
        L.LayerNormalization(axis=[1, -1])(np.ones((2, 3)))
    ln = L.LayerNormalization()
    ln(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"got an input of shape \(2, 4\)"):
        ln(np.ones((2, 4)))
    with pytest.raises(ValueError, match="epsilon=-1"):
        L.LayerNormalization(epsilon=-1)
    with pytest.raises(ValueError, match="groups=0"):
        L.GroupNormalization(groups=0)
    with pytest.raises(ValueError, match="groups=3 must divide the 4 channels"):
        L.GroupNormalization(groups=3)(np.ones((2, 4)))
    with pytest.raises(ValueError, match="axis=0 is the batch axis"):
        L.GroupNormalization(groups=1, axis=0)(np.ones((2, 4)))
    with pytest.raises(ValueError, match="padding='full'"):
        L.Conv1D(2, 3, padding="full")
    with pytest.raises(ValueError, match="filters=3, groups=2"):
        L.Conv1D(3, 3, groups=2)
    with pytest.raises(ValueError, match="3 input channels must be divisible by groups=2"):
        L.Conv1D(2, 1, groups=2)(np.ones((1, 4, 3)))
    with pytest.raises(ValueError, match="dilation_rate"):
        L.Conv1D(2, 3, strides=2, dilation_rate=2)
    with pytest.raises(ValueError, match=r"got shape \(1, 4\)"):
        c = L.Conv1D(2, 1)
        c(np.ones((1, 4, 3)))
        c(np.ones((1, 4)))
    with pytest.raises(ValueError, match="input length 2 is smaller"):
        L.Conv1D(2, 3)(np.ones((1, 2, 3)))
    with pytest.raises(ValueError, match=r"mask.shape=\(2, 3\)"):
        L.GlobalAveragePooling1D()(np.ones((2, 4, 3)), mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"got shape \(2, 4\)"):
        L.GlobalAveragePooling1D()(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"incompatible shapes \[\(2, 3\), \(2, 4\)\]"):
        L.Add()([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(ValueError, match=r"different batch sizes.*\(2, 3\), \(3, 3\)"):
        L.Add()([np.ones((2, 3)), np.ones((3, 3))])
    with pytest.raises(ValueError, match="list of arrays, got ndarray"):
        L.Add()(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"but axis=-1, got shapes \[\(2, 3, 1\), \(2, 2, 1\)\]"):
        L.Concatenate()([np.ones((2, 3, 1)), np.ones((2, 2, 1))])
    with pytest.raises(ValueError, match=r"axis=3 is out of range"):
        L.Concatenate(axis=3)([np.ones((2, 3)), np.ones((2, 3))])
    with pytest.raises(ValueError, match="same rank"):
        L.Concatenate()([np.ones((2, 3)), np.ones((2, 3, 1))])


# --- configs --------------------------------------------------------------------------------
CONFIG_LAYERS = [
    lambda: L.LayerNormalization(axis=[1, 2], epsilon=1e-5, center=False,
                                 gamma_regularizer="l2", beta_constraint="non_neg"),
    lambda: L.GroupNormalization(groups=4, axis=1, beta_initializer="ones", scale=False,
                                 dtype="float64", name="gn_cfg"),
    lambda: L.Conv1D(6, 3, strides=2, padding="causal", data_format="channels_first",
                     groups=3, activation="relu", use_bias=False, kernel_regularizer="l1"),
    lambda: L.GlobalAveragePooling1D(data_format="channels_first", keepdims=True),
    lambda: L.Add(trainable=False),
    lambda: L.Concatenate(axis=1, name="cat_cfg"),
]


@pytest.mark.parametrize("make", CONFIG_LAYERS, ids=range(len(CONFIG_LAYERS)))
def test_config_round_trip_and_registry(make):
    layer = make()
    cfg = layer.get_config()
    assert type(layer).from_config(cfg).get_config() == cfg
    rebuilt = L.deserialize(L.serialize(layer))
    assert type(rebuilt) is type(layer) and rebuilt.get_config() == cfg
    keras_style = L.deserialize({"class_name": type(layer).__name__, "config": cfg})
    assert keras_style.get_config() == cfg
    assert getattr(distbn, type(layer).__name__) is type(layer)
    assert L.get_layer_class(type(layer).__name__) is type(layer)


def test_rms_scaling_warns_and_has_no_beta():
    with pytest.warns(UserWarning, match="rms_scaling=True is deprecated"):
        layer = L.LayerNormalization(rms_scaling=True, center=True, scale=False)
    layer.build((2, 3))
    assert [w.name for w in layer.weights] == ["gamma"]  # as Keras


def test_keras_default_names():
    names = [L.LayerNormalization, L.GroupNormalization, L.GlobalAveragePooling1D, L.Add,
             L.Concatenate]
    for cls, base in zip(names, ["layer_normalization", "group_normalization",
                                 "global_average_pooling1d", "add", "concatenate"],
                         strict=True):
        assert cls().name.startswith(base)
    assert L.Conv1D(1, 1).name.startswith("conv1d")


def test_registry_aliases_and_group_norm_resolves_instance_norm():
    assert L.get_layer_class("Convolution1D") is L.Conv1D
    assert L.get_layer_class("GlobalAvgPool1D") is L.GlobalAveragePooling1D
    gn = L.GroupNormalization(groups=-1)
    assert gn.get_config()["groups"] == -1
    gn(np.ones((2, 3, 5)))
    assert gn.get_config()["groups"] == 5  # as Keras: resolved at build


# --- parity with Keras 3 (jax) --------------------------------------------------------------
os.environ.setdefault("KERAS_BACKEND", "jax")
TOL = {"float32": 2e-5, "float16": 2e-3}
GRAD_TOL = {"float32": 1e-4, "float16": 2e-3}


def _keras():
    keras = pytest.importorskip("keras")
    pytest.importorskip("jax")
    if keras.backend.backend() != "jax":
        pytest.skip("the parity tests need KERAS_BACKEND=jax")
    return keras


def _scaled_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def _check(what, a, b, tol):
    d = _scaled_diff(a, b)
    assert d <= tol, f"{what}: scaled max difference {d:.3g} > {tol}"


def _keras_vjps(cases):
    """Output, weight gradients and input gradient(s) of each Keras layer's stateless call,
    all cases in one jitted function (one compile).

    `cases`: (keras layer, input(s), cotangent, mask or None). Inputs are cast to the compute
    dtype inside the differentiated function where `Layer.__call__` would (autocast layers).
    """
    import jax

    layers = [c[0] for c in cases]
    masks = [c[3] for c in cases]

    def run(tvs, xss, ws):
        results = []
        for layer, mask, tv, xs, w in zip(layers, masks, tvs, xss, ws, strict=True):
            def f(tv, xs, layer=layer, mask=mask):
                if layer.autocast:
                    xs = jax.tree.map(lambda a: a.astype(layer.compute_dtype), xs)
                kw = {} if mask is None else {"mask": mask}
                out, _ = layer.stateless_call(tv, [], xs, **kw)
                return out

            out, pullback = jax.vjp(f, tv, xs)
            results.append((out, *pullback(w)))
        return results

    tvs = [[v.value for v in la.trainable_variables] for la in layers]
    got = jax.jit(run)(tvs, [c[1] for c in cases], [c[2] for c in cases])
    return jax.tree.map(np.asarray, got)


def _parity(pairs):
    """Run each (keras layer, distbn layer, input(s), mask) through both; compare outputs,
    input gradients and weight gradients, and the weights' names and order.

    Returns the Keras results (output, weight grads, input grads) per case.
    """
    cases, mine = [], []
    for kl, dl, xs, mask in pairs:
        shape = [x.shape for x in xs] if isinstance(xs, list) else xs.shape
        kl.build(shape)
        dl.build(shape)
        assert [v.path for v in kl.weights] == [v.path.replace(dl.name, kl.name, 1)
                                                for v in dl.weights]
        ws = [RNG.normal(1.0 if v.name == "gamma" else 0.0, 0.5, v.shape).astype(np.float32)
              for v in dl.weights]
        kl.set_weights(ws)
        dl.set_weights(ws)
        d_out = dl(xs, training=True, **({} if mask is None else {"mask": mask}))
        w = RNG.standard_normal(d_out.shape).astype(d_out.dtype)
        d_gx = dl.backward(w)
        cases.append((kl, xs, w, mask))
        mine.append((dl, d_out, d_gx, [v.grad for v in dl.trainable_weights]))
    results = _keras_vjps(cases)
    for i, ((dl, d_out, d_gx, d_gtv), (k_out, k_gtv, k_gx)) in enumerate(
            zip(mine, results, strict=True)):
        kind = str(k_out.dtype)
        where = f"{type(dl).__name__} case {i}"
        assert d_out.dtype == k_out.dtype, where
        finite = np.isfinite(k_out)
        _check(f"output of {where}", d_out[finite], k_out[finite], TOL[kind])
        for dg, kg in zip(_as_list(d_gx), _as_list(k_gx), strict=True):
            assert dg.dtype == kg.dtype, where
            finite = np.isfinite(kg)
            _check(f"dx of {where}", dg[finite], kg[finite], GRAD_TOL[kind])
        assert len(d_gtv) == len(k_gtv), where
        for dv, dg, kg in zip(dl.trainable_weights, d_gtv, k_gtv, strict=True):
            _check(f"d{dv.name} of {where}", dg, kg, GRAD_TOL[kind])
    return results


def _x(shape, loc=0.0):
    return RNG.normal(loc, 2.0, shape).astype(np.float32)


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
def test_layer_normalization_matches_keras():
    keras = _keras()
    cases = [
        (dict(), (3, 4, 5), 0.0),
        (dict(axis=[1, 2], center=False), (2, 3, 4), 3.0),
        (dict(axis=[-3, -1], epsilon=1e-5), (2, 3, 2, 4), 0.0),
        (dict(axis=1, scale=False, epsilon=0.1), (4, 5, 2), 50.0),
        (dict(rms_scaling=True), (4, 6), 1.0),
        (dict(axis=-2, dtype="mixed_float16"), (3, 4, 2), 0.0),
    ]
    pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_scaling's deprecation warning, both sides
        for kw, shape, loc in cases:
            pairs.append((keras.layers.LayerNormalization(**kw),
                          L.LayerNormalization(**kw), _x(shape, loc), None))
    _parity(pairs)


def test_group_normalization_matches_keras():
    keras = _keras()
    cases = [
        (dict(groups=3), (2, 5, 6), 0.0),
        (dict(groups=2, axis=1), (2, 4, 3, 3), 3.0),
        (dict(groups=-1), (3, 4, 4), 0.0),
        (dict(groups=1, center=False, epsilon=1e-5), (2, 6, 4), 0.0),
        (dict(groups=4, axis=-2, scale=False), (2, 3, 8, 2), 10.0),
        (dict(groups=2, dtype="mixed_float16"), (2, 3, 4), 0.0),
    ]
    _parity([(keras.layers.GroupNormalization(**kw), L.GroupNormalization(**kw),
              _x(shape, loc), None) for kw, shape, loc in cases])


def test_conv1d_matches_keras():
    keras = _keras()
    cases = [
        (dict(filters=4, kernel_size=3), (2, 7, 3)),
        (dict(filters=6, kernel_size=3, padding="same", strides=2, groups=2), (2, 8, 4)),
        (dict(filters=2, kernel_size=2, padding="causal", dilation_rate=2,
              activation="tanh"), (2, 6, 3)),
        (dict(filters=4, kernel_size=3, padding="causal", strides=2, groups=2,
              data_format="channels_first"), (2, 4, 7)),
        (dict(filters=3, kernel_size=5, padding="same", use_bias=False), (1, 5, 2)),
        (dict(filters=3, kernel_size=2, groups=3, dilation_rate=3, activation="relu",
              data_format="channels_first"), (2, 6, 9)),
    ]
    _parity([(keras.layers.Conv1D(**kw), L.Conv1D(**kw), _x(shape), None)
             for kw, shape in cases])


def test_global_average_pooling_1d_matches_keras():
    keras = _keras()
    some = np.array([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    all_masked = np.array([[1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]], bool)
    cases = [
        (dict(), (3, 5, 4), None),
        (dict(), (3, 5, 4), some),
        (dict(data_format="channels_first", keepdims=True), (3, 2, 5), some),
        (dict(keepdims=True), (2, 6, 3), None),
        (dict(), (2, 6, 3), all_masked.astype(np.float32)),  # float mask, binarised
    ]
    results = _parity([(keras.layers.GlobalAveragePooling1D(**kw),
                        L.GlobalAveragePooling1D(**kw), _x(shape), mask)
                       for kw, shape, mask in cases])
    # The all-masked sample: Keras divides 0 by 0; distbn gives zeros (documented).
    assert np.isnan(results[-1][0][1]).all()


def test_merge_layers_match_keras():
    keras = _keras()
    add_cases = [[(2, 3, 4), (2, 3, 4)], [(2, 3, 4), (2, 1, 4), (2, 3, 1)],
                 [(2, 4), (2, 3, 4)]]
    cat_cases = [(-1, [(2, 3, 4), (2, 3, 2)]), (1, [(2, 3, 4), (2, 1, 4), (2, 2, 4)]),
                 (-2, [(2, 2, 3, 2), (2, 2, 1, 2)])]
    pairs = [(keras.layers.Add(), L.Add(), [_x(s) for s in shapes], None)
             for shapes in add_cases]
    pairs += [(keras.layers.Concatenate(axis=axis), L.Concatenate(axis=axis),
               [_x(s) for s in shapes], None) for axis, shapes in cat_cases]
    _parity(pairs)


def _jsonable(obj):
    return json.loads(json.dumps(obj))


KERAS_CONFIGS = [
    ("LayerNormalization", dict(axis=[1, 2], epsilon=1e-5, center=False,
                                gamma_regularizer="l2", beta_constraint="non_neg")),
    ("LayerNormalization", dict(axis=-2, beta_initializer="random_normal",
                                gamma_constraint="unit_norm", name="ln_k")),
    ("GroupNormalization", dict(groups=4, axis=1, epsilon=1e-4, scale=False,
                                beta_regularizer="l1", gamma_initializer="he_normal")),
    ("Conv1D", dict(filters=6, kernel_size=3, strides=2, padding="causal", groups=3,
                    data_format="channels_first", activation="relu", use_bias=False,
                    kernel_regularizer="l2", bias_constraint="non_neg")),
    ("Conv1D", dict(filters=2, kernel_size=(4,), dilation_rate=2, padding="same",
                    kernel_initializer="he_uniform", dtype="float64")),
    ("GlobalAveragePooling1D", dict(data_format="channels_first", keepdims=True)),
    ("Add", dict(name="add_k", trainable=False)),
    ("Concatenate", dict(axis=1)),
]


def _normalize_cfg(obj):
    # distbn writes an initializer's fan axes only when set (older Keras rejects them).
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        return {**obj, "config": {k: v for k, v in obj["config"].items()
                                  if not (k in ("input_axes", "output_axes") and v is None)}}
    return obj


@pytest.mark.parametrize("class_name,kwargs", KERAS_CONFIGS, ids=range(len(KERAS_CONFIGS)))
def test_keras_configs_load_both_ways(class_name, kwargs):
    keras = _keras()
    k_cfg = _jsonable(getattr(keras.layers, class_name)(**kwargs).get_config())
    dl = getattr(distbn, class_name).from_config(k_cfg)
    mine = _jsonable(dl.get_config())
    for key, value in mine.items():
        if key == "dtype":
            assert value == k_cfg["dtype"]["config"]["name"]
        else:
            assert _normalize_cfg(k_cfg[key]) == value, key
    assert set(k_cfg) - set(mine) <= {"activity_regularizer"}
    back = getattr(keras.layers, class_name).from_config(mine)
    assert _jsonable(back.get_config()) == {**k_cfg, "dtype": _jsonable(back.get_config())["dtype"]}
