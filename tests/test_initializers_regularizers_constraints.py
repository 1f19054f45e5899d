"""Initializers, regularizers and constraints: Keras names, formulas, configs, errors."""

import json
import math

import numpy as np
import pytest

from distbn import constraints, initializers, regularizers
from distbn import random as drandom

KERAS_INIT_NAMES = ["zeros", "ones", "constant", "random_normal", "random_uniform",
                    "truncated_normal", "glorot_uniform", "glorot_normal", "he_uniform",
                    "he_normal", "lecun_uniform", "lecun_normal", "variance_scaling",
                    "orthogonal", "Zeros", "GlorotUniform", "HeNormal", "RandomNormal"]


@pytest.mark.parametrize("name", KERAS_INIT_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_initializer_names_shape_dtype(name, dtype):
    init = initializers.get(name)
    out = init((3, 4), dtype)
    assert out.shape == (3, 4) and out.dtype == np.dtype(dtype)
    assert np.isfinite(out).all()


def test_compute_fans_as_keras():
    assert initializers.compute_fans(()) == (1, 1)
    assert initializers.compute_fans((7,)) == (7, 7)
    assert initializers.compute_fans((5, 3)) == (5, 3)
    # conv kernel (kh, kw, in, out): receptive field 3*3
    assert initializers.compute_fans((3, 3, 4, 8)) == (36, 72)


@pytest.mark.parametrize("name,limit", [
    ("glorot_uniform", lambda fi, fo: math.sqrt(6 / (fi + fo))),
    ("he_uniform", lambda fi, fo: math.sqrt(6 / fi)),
    ("lecun_uniform", lambda fi, fo: math.sqrt(3 / fi)),
])
def test_uniform_variance_scaling_limits(name, limit):
    shape = (3, 3, 16, 32)
    w = initializers.get(name)(shape, "float64")
    lim = limit(*initializers.compute_fans(shape))
    assert np.abs(w).max() <= lim
    assert np.abs(w).max() > 0.95 * lim  # 4608 draws reach close to the limit
    assert abs(w.std() - lim / math.sqrt(3)) < 0.05 * lim


@pytest.mark.parametrize("name,std", [
    ("glorot_normal", lambda fi, fo: math.sqrt(2 / (fi + fo))),
    ("he_normal", lambda fi, fo: math.sqrt(2 / fi)),
    ("lecun_normal", lambda fi, fo: math.sqrt(1 / fi)),
])
def test_truncated_normal_variance_scaling_std(name, std):
    shape = (64, 256)
    w = initializers.get(name)(shape, "float64")
    s = std(*initializers.compute_fans(shape))
    # Keras rescales the truncated normal so that the *truncated* std is sqrt(scale/n).
    assert abs(w.std() - s) < 0.03 * s
    assert np.abs(w).max() <= 2 * s / 0.87962566103423978 + 1e-12


def test_truncated_normal_bounds():
    w = initializers.TruncatedNormal(mean=1.0, stddev=0.5, seed=3)((2000,), "float64")
    assert w.min() >= 0.0 and w.max() <= 2.0


def test_seeded_initializer_repeats_and_unseeded_follows_global_seed():
    a = initializers.RandomNormal(seed=7)((5,))
    b = initializers.RandomNormal(seed=7)((5,))
    np.testing.assert_array_equal(a, b)
    drandom.set_seed(11)
    u1 = initializers.get("glorot_uniform")((4, 4))
    drandom.set_seed(11)
    u2 = initializers.get("glorot_uniform")((4, 4))
    np.testing.assert_array_equal(u1, u2)
    assert not np.array_equal(u1, initializers.get("glorot_uniform")((4, 4)))


def test_initializer_keras_dict_and_config_round_trip():
    d = {"module": "keras.initializers", "class_name": "VarianceScaling",
         "config": {"scale": 2.0, "mode": "fan_out", "distribution": "uniform", "seed": 4},
         "registered_name": None}
    init = initializers.get(d)
    assert (init.scale, init.mode, init.distribution, init.seed) == (2.0, "fan_out",
                                                                     "uniform", 4)
    again = initializers.get(json.loads(json.dumps(initializers.serialize(init))))
    np.testing.assert_array_equal(init((3, 5)), again((3, 5)))
    c = initializers.get({"class_name": "Constant", "config": {"value": 2.5}})
    np.testing.assert_array_equal(c((2,), "float64"), [2.5, 2.5])
    assert initializers.get(init) is init
    fn = lambda shape, dtype: np.full(shape, 3.0, dtype)  # noqa: E731
    assert initializers.get(fn) is fn
    assert isinstance(initializers.get(initializers.Ones), initializers.Ones)


@pytest.mark.parametrize("bad", ["glorot", 3, {"class_name": "Nope", "config": {}},
                                 {"class_name": "Zeros", "module": "other.module"}])
def test_initializer_invalid_identifier(bad):
    with pytest.raises(ValueError) as err:
        initializers.get(bad)
    assert repr(bad) in str(err.value)


def test_variance_scaling_invalid_arguments():
    with pytest.raises(ValueError, match="-1"):
        initializers.VarianceScaling(scale=-1)
    with pytest.raises(ValueError, match="fan_sideways"):
        initializers.VarianceScaling(mode="fan_sideways")
    with pytest.raises(ValueError, match="gamma"):
        initializers.VarianceScaling(distribution="gamma")


# --- regularizers ------------------------------------------------------------------------
def test_regularizer_formulas_and_gradients():
    x = np.array([[1.0, -2.0], [0.5, 0.0]])
    l1 = regularizers.get("l1")
    l2 = regularizers.get("l2")
    both = regularizers.get("l1_l2")
    assert l1(x) == pytest.approx(0.01 * 3.5)
    assert l2(x) == pytest.approx(0.01 * 5.25)  # Keras: l2 * sum(x**2), no 1/2
    assert both(x) == pytest.approx(0.01 * 3.5 + 0.01 * 5.25)
    np.testing.assert_allclose(l2.gradient(x), 0.02 * x)
    np.testing.assert_allclose(l1.gradient(x), 0.01 * np.sign(x))
    # central differences of the L1L2 penalty away from the kink
    reg = regularizers.L1L2(l1=0.3, l2=0.7)
    y = np.array([0.4, -1.3, 2.0])
    h = 1e-6
    num = [(reg(y + h * e) - reg(y - h * e)) / (2 * h) for e in np.eye(3)]
    np.testing.assert_allclose(reg.gradient(y), num, rtol=1e-6)


def test_regularizer_keras_dicts_and_config():
    r = regularizers.get({"module": "keras.regularizers", "class_name": "L2",
                          "config": {"l2": 1e-4}, "registered_name": None})
    assert isinstance(r, regularizers.L2) and r.l2 == 1e-4
    assert regularizers.serialize(r) == {"module": "keras.regularizers", "class_name": "L2",
                                         "config": {"l2": 1e-4}, "registered_name": None}
    r2 = regularizers.get({"class_name": "L1L2", "config": {"l1": 0.1, "l2": 0.2}})
    assert (r2.l1, r2.l2) == (0.1, 0.2)
    assert regularizers.L1L2().get_config() == {"l1": 0.0, "l2": 0.0}
    assert regularizers.get(None) is None


@pytest.mark.parametrize("bad", ["l3", 5, {"class_name": "L7", "config": {}}])
def test_regularizer_invalid_identifier(bad):
    with pytest.raises(ValueError, match="regularizer identifier") as err:
        regularizers.get(bad)
    assert repr(bad) in str(err.value)


def test_regularizer_invalid_factor():
    with pytest.raises(ValueError, match=r"l2=-0\.5"):
        regularizers.L2(-0.5)
    with pytest.raises(ValueError, match="l1=nan"):
        regularizers.L1(float("nan"))


# --- constraints -------------------------------------------------------------------------
def test_constraint_formulas():
    w = np.array([[3.0, -1.0], [4.0, 0.5]])
    np.testing.assert_array_equal(constraints.get("non_neg")(w), [[3.0, 0.0], [4.0, 0.5]])
    norms0 = np.sqrt((w ** 2).sum(0, keepdims=True))  # Keras' default axis 0
    np.testing.assert_allclose(constraints.get("unit_norm")(w), w / (1e-7 + norms0))
    mx = constraints.get("max_norm")(w)  # max_value 2
    np.testing.assert_allclose(mx, w * np.clip(norms0, 0, 2) / (1e-7 + norms0))
    mm = constraints.MinMaxNorm(min_value=0.5, max_value=1.0, rate=0.5)(w)
    desired = 0.5 * np.clip(norms0, 0.5, 1.0) + 0.5 * norms0
    np.testing.assert_allclose(mm, w * desired / (1e-7 + norms0))
    assert constraints.get("max_norm")(w.astype(np.float32)).dtype == np.float32


def test_constraint_keras_dicts_and_config():
    c = constraints.get({"module": "keras.constraints", "class_name": "MaxNorm",
                         "config": {"max_value": 3, "axis": [0, 1]}, "registered_name": None})
    assert c.max_value == 3 and c.axis == (0, 1)
    assert constraints.serialize(constraints.NonNeg()) == {
        "module": "keras.constraints", "class_name": "NonNeg", "config": {},
        "registered_name": None}
    assert constraints.get(None) is None


@pytest.mark.parametrize("bad", ["positive", 1.5, {"class_name": "Clip", "config": {}}])
def test_constraint_invalid_identifier(bad):
    with pytest.raises(ValueError, match="constraint identifier") as err:
        constraints.get(bad)
    assert repr(bad) in str(err.value)
