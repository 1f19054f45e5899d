"""Sequential: forward/backward, sample ids, named weights, weight dicts, summary, config."""

import numpy as np
import pytest
from gradcheck import numeric_grad

import distbn.layers as L
from distbn.models import Sequential

RNG = np.random.default_rng(7)


def small_model(dtype="float64", dropout=0.0, seed=0):
    return Sequential([
        L.Conv2D(3, 3, padding="same", activation="relu", name="c1", dtype=dtype,
                 kernel_regularizer="l2"),
        L.MaxPooling2D(name="p1", dtype=dtype),
        L.Flatten(name="f", dtype=dtype),
        L.Dropout(dropout, seed=seed, name="d", dtype=dtype),
        L.Dense(4, name="out", dtype=dtype),
    ], name="m")




def test_named_weights_and_build():
    model = small_model()
    model.build((None, 6, 6, 2))
    assert list(model.named_weights()) == ["c1/kernel", "c1/bias", "out/kernel", "out/bias"]
    assert model.named_weights()["out/kernel"].shape == (27, 4)
    assert len(model.trainable_weights) == 4 and model.non_trainable_weights == []
    assert model.compute_output_shape((None, 6, 6, 2)) == (None, 4)
    model.get_layer("out").trainable = False
    assert [w.path for w in model.non_trainable_weights] == ["out/kernel", "out/bias"]
    with pytest.raises(ValueError, match="no layer 'zz'"):
        model.get_layer("zz")


def test_forward_backward_gradients():
    model = small_model(dropout=0.3)
    x = RNG.standard_normal((3, 6, 6, 2))
    proj = RNG.standard_normal((3, 4))
    kwargs = {"training": True, "sample_ids": np.array([5, 9, 2]), "step": 4}

    def loss():
        return float(np.sum(model(x, **kwargs) * proj)) + model.regularization_loss

    loss()
    dx = model.backward(proj)
    grads = {k: w.grad.copy() for k, w in model.named_weights().items()}
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    for key, w in model.named_weights().items():
        np.testing.assert_allclose(grads[key], numeric_grad(loss, w.value), rtol=1e-6,
                                   atol=1e-8, err_msg=key)


def test_regularization_scale():
    model = small_model()
    x = RNG.standard_normal((2, 6, 6, 2))
    model(x)
    model.backward(np.ones((2, 4)))
    full = model.named_weights()["c1/kernel"].grad.copy()
    reg = model.named_weights()["c1/kernel"].regularizer.gradient(
        model.named_weights()["c1/kernel"].value)
    model(x)
    model.backward(np.ones((2, 4)), regularization_scale=0.25)
    np.testing.assert_allclose(model.named_weights()["c1/kernel"].grad, full - 0.75 * reg,
                               rtol=1e-12, atol=1e-14)
    assert len(model.losses) == 1 and model.regularization_loss == model.losses[0] > 0


def test_sample_ids_make_slices_reproduce_the_whole_batch():
    x = RNG.standard_normal((8, 6, 6, 2))
    ids = np.arange(40, 48)
    whole = small_model(dropout=0.5, seed=11)
    weights = None
    whole.build((None, 6, 6, 2))
    weights = whole.get_weight_dict()
    y_all = whole(x, training=True, sample_ids=ids, step=2)
    parts = []
    for lo, hi in [(0, 3), (3, 8)]:
        rank_model = small_model(dropout=0.5, seed=11)
        rank_model.build((None, 6, 6, 2))
        rank_model.set_weight_dict(weights)
        parts.append(rank_model(x[lo:hi], training=True, sample_ids=ids[lo:hi], step=2))
    np.testing.assert_allclose(np.concatenate(parts), y_all, rtol=1e-12)
    with pytest.raises(ValueError, match="one id per row"):
        whole(x, training=True, sample_ids=ids[:3])


def test_weight_dict_round_trip_and_errors():
    model = small_model()
    model.build((None, 6, 6, 2))
    saved = model.get_weight_dict()
    saved["out/bias"] = saved["out/bias"] + 1.0
    model.set_weight_dict(saved)
    np.testing.assert_array_equal(model.named_weights()["out/bias"].value, saved["out/bias"])
    # get_weight_dict returns copies
    saved["out/bias"][0] = 123.0
    assert model.named_weights()["out/bias"].value[0] != 123.0

    before = model.get_weight_dict()
    bad = dict(before, **{"c1/kernel": before["c1/kernel"] + 5})
    bad["out/kernel"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"'out/kernel' has shape \(3, 3\)"):
        model.set_weight_dict(bad)
    # nothing was loaded, not even the valid c1/kernel that came first
    np.testing.assert_array_equal(model.named_weights()["c1/kernel"].value,
                                  before["c1/kernel"])
    missing = {k: v for k, v in before.items() if k != "c1/bias"}
    with pytest.raises(ValueError, match="lacks 'c1/bias'"):
        model.set_weight_dict(missing)
    with pytest.raises(ValueError, match="unexpected tensor 'x/y'"):
        model.set_weight_dict(dict(before, **{"x/y": np.zeros(1)}))


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="duplicate layer name 'a'"):
        Sequential([L.Dense(2, name="a"), L.Dense(3, name="a")])
    model = Sequential([L.Dense(2, name="b")])
    with pytest.raises(ValueError, match="duplicate layer name 'b'"):
        model.add(L.ReLU(name="b"))


def test_summary_counts():
    model = small_model()
    with pytest.raises(ValueError, match="not built"):
        model.summary()
    model.build((None, 6, 6, 2))
    text = model.summary()
    # conv: 3*3*2*3 + 3 = 57; dense: 27*4 + 4 = 112
    assert "Total params: 169" in text and "Trainable params: 169" in text
    assert "Non-trainable params: 0" in text
    lines = {line.split()[0]: line for line in text.splitlines()[4:9]}
    assert lines["c1"].split()[-1] == "57" and lines["out"].split()[-1] == "112"
    assert "(None, 3, 3, 3)" in lines["p1"]
    assert model.count_params() == 169


def test_config_round_trip_and_dict_layers():
    model = small_model()
    again = Sequential.from_config(model.get_config())
    assert [la.get_config() for la in again.layers] == [la.get_config() for la in model.layers]
    built = Sequential([{"type": "Dense", "units": 2, "name": "z"}])
    assert isinstance(built.layers[0], L.Dense)
    with pytest.raises(TypeError, match="expected a Layer"):
        Sequential([object()])


def test_default_dtype_float32():
    model = Sequential([L.Dense(3), L.ReLU(), L.Dense(2)])
    y = model(np.ones((4, 5)))
    assert y.dtype == np.float32
    assert model.backward(np.ones((4, 2))).dtype == np.float32
    assert all(w.grad.dtype == np.float32 for w in model.trainable_weights)


def test_sliced_gradients_sum_to_whole_batch_gradient():
    # What the trainer relies on: per-rank sum-loss gradients divided by the GLOBAL count,
    # summed over ranks, equal the one-process gradient of the mean loss (dropout included).
    from distbn.train import losses

    x = RNG.standard_normal((7, 6, 6, 2))
    labels = np.array([0, 3, 1, 2, 2, 0, 1])
    ids = np.arange(7)
    model = small_model(dropout=0.4, seed=5)
    model.build((None, 6, 6, 2))
    weights = model.get_weight_dict()

    def grads(m, lo, hi):
        out = m(x[lo:hi], training=True, sample_ids=ids[lo:hi], step=9)
        _, g = losses.sparse_categorical_crossentropy(out, labels[lo:hi], from_logits=True)
        m.backward(g / len(x), regularization_scale=0.0)
        return {k: w.grad.copy() for k, w in m.named_weights().items()}

    whole = grads(model, 0, 7)
    total = None
    for lo, hi in [(0, 2), (2, 2), (2, 7)]:
        rank = small_model(dropout=0.4, seed=5)
        rank.build((None, 6, 6, 2))
        rank.set_weight_dict(weights)
        part = grads(rank, lo, hi)
        total = part if total is None else {k: total[k] + part[k] for k in total}
    for key in whole:
        np.testing.assert_allclose(total[key], whole[key], rtol=1e-10, atol=1e-14,
                                   err_msg=key)


def test_small_model_learns():
    from distbn import random as drandom
    from distbn.train import losses, optimizers

    drandom.set_seed(0)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-1, 0.5, (64, 2)), rng.normal(1, 0.5, (64, 2))])
    y = np.repeat([0, 1], 64)
    model = Sequential([L.Dense(8, activation="tanh"), L.Dense(2)])
    opt = optimizers.SGD(0.5, momentum=0.9)
    for step in range(60):
        out = model(x, training=True, step=step)
        _, g = losses.sparse_categorical_crossentropy(out, y, from_logits=True)
        model.backward(g / len(x))
        opt.apply(model.trainable_weights)
    assert losses.accuracy(model(x), y) >= 124


@pytest.mark.parametrize("first", ["conv", "dense", "branches"])
def test_backward_without_the_input_gradient_gives_the_same_weight_gradients(first):
    # The trainer never needs dL/dx of the data: input_grad=False lets the layers that
    # read the input skip it; every weight's gradient must be the same bits.
    from distbn.models import Model

    rng = np.random.default_rng(4)
    f64 = {"dtype": "float64"}
    if first == "conv":
        model = Sequential([L.Conv2D(4, 3, padding="same", kernel_regularizer="l2", **f64),
                            L.BatchNormalization(**f64), L.ReLU(**f64),
                            L.GlobalAveragePooling2D(**f64), L.Dense(3, **f64)])
        x = rng.standard_normal((5, 6, 6, 3))
    elif first == "dense":
        model = Sequential([L.Dense(6, activation="relu", **f64), L.Dense(3, **f64)])
        x = rng.standard_normal((5, 4))
    else:  # the input feeds a Dense and a ReLU: the ReLU's input gradient is still made
        model = Model([L.Dense(4, name="a", **f64), L.ReLU(name="b", **f64),
                       L.Concatenate(name="c", **f64), L.Dense(3, name="d", **f64)],
                      inputs={"b": ["input"], "c": ["a", "b"]})
        x = rng.standard_normal((5, 4))
    dy = rng.standard_normal(model(x, training=True).shape)
    want_dx = model.backward(dy)
    want = [w.grad.copy() for w in model.trainable_weights]
    model(x, training=True)
    calls = []
    for layer in model.layers:
        def spy(d, _real=layer.backward, _name=layer.name, **kw):
            calls.append((_name, kw.get("input_grad", True)))
            return _real(d, **kw)
        layer.backward = spy
    assert model.backward(dy, input_grad=False) is None
    skipped = {name for name, wanted in calls if not wanted}
    assert skipped == {model.layers[0].name}  # the layer reading the input, only
    got = [w.grad for w in model.trainable_weights]
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert want_dx is not None and want_dx.shape == x.shape
