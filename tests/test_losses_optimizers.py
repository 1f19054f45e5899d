"""Losses (values, gradients, label checks), optimizers (Keras formulas), clipping,
schedules, constraints and optimizer state."""

import math

import numpy as np
import pytest
from gradcheck import numeric_grad

from distbn import constraints
from distbn.layers.base import Variable
from distbn.train import losses, optimizers, schedules

RNG = np.random.default_rng(3)




# --- losses ------------------------------------------------------------------------------
def test_sparse_categorical_crossentropy_values_and_gradient():
    logits = RNG.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    per_sample, grad = losses.sparse_categorical_crossentropy(logits, labels, from_logits=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(per_sample, -np.log(p[np.arange(5), labels]), rtol=1e-12)
    w = RNG.standard_normal(5)  # a weighted sum checks each row's gradient separately

    def weighted():
        per = losses.sparse_categorical_crossentropy(logits, labels, from_logits=True)[0]
        return float(np.sum(per * w))

    np.testing.assert_allclose(grad * w[:, None], numeric_grad(weighted, logits), rtol=1e-6,
                               atol=1e-9)


def test_crossentropy_is_stable_and_keeps_dtype():
    logits = np.array([[1000.0, -1000.0, 0.0]], dtype=np.float32)
    per_sample, grad = losses.sparse_categorical_crossentropy(logits, [1], from_logits=True)
    assert np.isfinite(per_sample).all() and per_sample[0] == pytest.approx(2000.0)
    assert grad.dtype == np.float32
    np.testing.assert_allclose(grad, [[1.0, -1.0, 0.0]], atol=1e-6)
    # N-D logits: labels carry the leading axes
    per_pos, g = losses.sparse_categorical_crossentropy(np.zeros((2, 3, 4)),
                                                        np.zeros((2, 3), int), from_logits=True)
    np.testing.assert_allclose(per_pos, np.log(4.0))
    assert g.shape == (2, 3, 4)


def test_crossentropy_of_probabilities_matches_keras_and_central_differences():
    """from_logits=False (Keras' default): the input is normalised and clipped."""
    p = RNG.random((6, 4)) + 0.05
    p[0] = [1.0, 0.0, 0.0, 0.0]  # clipped: -log(1e-7) at label 1, no gradient
    labels = np.array([1, 3, 1, 0, 2, 2])
    per_sample, grad = losses.sparse_categorical_crossentropy(p, labels)
    q = p / p.sum(axis=1, keepdims=True)
    expected = -np.log(np.clip(q[np.arange(6), labels], 1e-7, 1 - 1e-7))
    np.testing.assert_allclose(per_sample, expected, rtol=1e-12)
    np.testing.assert_allclose(grad[0], 0.0)
    w = RNG.standard_normal(6)

    def weighted():
        return float(np.sum(losses.sparse_categorical_crossentropy(p, labels)[0] * w))

    # (row 0 sits on the clip's kink, where central differences do not apply)
    np.testing.assert_allclose((grad * w[:, None])[1:], numeric_grad(weighted, p)[1:],
                               rtol=1e-6, atol=1e-9)
    keras = pytest.importorskip("keras")
    ref = keras.ops.convert_to_numpy(keras.losses.sparse_categorical_crossentropy(
        labels, p.astype("float32")))
    np.testing.assert_allclose(per_sample, ref, rtol=1e-5)


def test_label_checks():
    logits = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"in \[0, 4\).*got label 4"):
        losses.sparse_categorical_crossentropy(logits, [0, 4, 1], from_logits=True)
    with pytest.raises(ValueError, match="got label -1"):
        losses.sparse_categorical_crossentropy(logits, [0, -1, 1], from_logits=True)
    with pytest.raises(ValueError, match="integer class ids"):
        losses.sparse_categorical_crossentropy(logits, [0.5, 1, 1], from_logits=True)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        losses.sparse_categorical_crossentropy(logits, [0, 1], from_logits=True)
    with pytest.raises(ValueError, match="got label 9"):
        losses.accuracy(logits, [0, 9, 1])
    # integral floats are accepted
    losses.sparse_categorical_crossentropy(logits, np.array([0.0, 1.0, 3.0]), from_logits=True)


def test_mean_squared_error():
    pred = RNG.standard_normal((4, 3, 2))
    target = RNG.standard_normal((4, 3, 2))
    per_sample, grad = losses.mean_squared_error(pred, target)
    np.testing.assert_allclose(per_sample, ((pred - target) ** 2).mean(axis=(1, 2)))
    w = RNG.standard_normal(4)

    def weighted():
        return float(np.sum(losses.mean_squared_error(pred, target)[0] * w))

    np.testing.assert_allclose(grad * w[:, None, None], numeric_grad(weighted, pred),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        losses.mean_squared_error(pred, target[:2])


def test_accuracy_and_get():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert losses.accuracy(logits, [1, 1, 1]) == 2
    assert losses.get("mse") is losses.mean_squared_error
    with pytest.raises(ValueError, match="did you mean 'sparse_categorical_crossentropy'"):
        losses.get("sparse_categorical_crossentropi")


# --- optimizers --------------------------------------------------------------------------
def var(values, name="w", constraint=None, dtype=np.float64):
    v = Variable(np.array(values, dtype=dtype), name, constraint=constraint)
    v.path = f"layer/{name}"
    return v


def run(opt, v, grads):
    for g in grads:
        v.grad = np.array(g, dtype=v.dtype)
        opt.apply([v])
    return v.numpy()


G1, G2 = [0.5, 0.1], [-0.2, 0.3]


def test_sgd_plain_and_momentum():
    np.testing.assert_allclose(run(optimizers.SGD(0.1), var([1.0, -2.0]), [G1]),
                               [1 - 0.05, -2 - 0.01])
    # Keras: m = 0.9 m - lr g; w += m
    m1 = [-0.1 * 0.5, -0.1 * 0.1]
    m2 = [0.9 * m1[0] + 0.02, 0.9 * m1[1] - 0.03]
    expected = [1.0 + m1[0] + m2[0], -2.0 + m1[1] + m2[1]]
    got = run(optimizers.SGD(0.1, momentum=0.9), var([1.0, -2.0]), [G1, G2])
    np.testing.assert_allclose(got, expected, rtol=1e-14)


def test_sgd_nesterov():
    # Keras: m = 0.9 m - lr g; w += 0.9 m - lr g
    m1 = [-0.05, -0.01]
    w1 = [1.0 + 0.9 * m1[0] - 0.05, -2.0 + 0.9 * m1[1] - 0.01]
    m2 = [0.9 * m1[0] + 0.02, 0.9 * m1[1] - 0.03]
    w2 = [w1[0] + 0.9 * m2[0] + 0.02, w1[1] + 0.9 * m2[1] - 0.03]
    opt = optimizers.SGD(0.1, momentum=0.9, nesterov=True)
    v = var([1.0, -2.0])
    np.testing.assert_allclose(run(opt, v, [G1]), w1, rtol=1e-14)
    np.testing.assert_allclose(run(opt, v, [G2]), w2, rtol=1e-14)
    assert opt.iterations == 2


def test_adam_epsilon_placement():
    # One step, g = 1: m = 0.1, v = 0.001, alpha = lr sqrt(1 - 0.999) / (1 - 0.9);
    # Keras puts epsilon on sqrt(v) (not on the bias-corrected sqrt(v_hat)).
    lr, eps = 0.01, 0.1
    alpha = lr * math.sqrt(1 - 0.999) / (1 - 0.9)
    expected = 2.0 - alpha * 0.1 / (math.sqrt(0.001) + eps)
    got = run(optimizers.Adam(lr, epsilon=eps), var([2.0]), [[1.0]])
    np.testing.assert_allclose(got, [expected], rtol=1e-14)
    assert abs(expected - (2.0 - lr / (1 + eps))) > 1e-3  # PyTorch placement differs


def test_adam_two_steps():
    b1, b2, lr, eps = 0.9, 0.999, 0.001, 1e-7
    w, m, v = 1.5, 0.0, 0.0
    for t, g in enumerate([0.5, -0.2], start=1):
        m = m + (g - m) * (1 - b1)
        v = v + (g * g - v) * (1 - b2)
        w = w - m * lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) / (math.sqrt(v) + eps)
    got = run(optimizers.Adam(), var([1.5]), [[0.5], [-0.2]])
    np.testing.assert_allclose(got, [w], rtol=1e-13)


def test_adam_amsgrad_keeps_max_velocity():
    opt = optimizers.Adam(0.1, amsgrad=True)
    v = var([0.0])
    run(opt, v, [[3.0], [0.0]])
    state = opt.get_state()
    assert state["layer/w/velocity_hat"][0] >= state["layer/w/velocity"][0]
    assert state["layer/w/velocity_hat"][0] == pytest.approx(0.001 * 9)


def test_adamw_and_keras_weight_decay():
    lr, wd = 0.01, 0.1
    # decay first (w -= w wd lr), then the Adam step on the decayed weight
    w = 2.0 - 2.0 * wd * lr
    alpha = lr * math.sqrt(1 - 0.999) / (1 - 0.9)
    expected = w - alpha * 0.1 / (math.sqrt(0.001) + 1e-7)
    np.testing.assert_allclose(run(optimizers.AdamW(lr, weight_decay=wd), var([2.0]), [[1.0]]),
                               [expected], rtol=1e-14)
    # Keras 3 applies the same decoupled decay for Adam and SGD
    np.testing.assert_allclose(run(optimizers.Adam(lr, weight_decay=wd), var([2.0]), [[1.0]]),
                               [expected], rtol=1e-14)
    np.testing.assert_allclose(run(optimizers.SGD(lr, weight_decay=wd), var([2.0]), [[1.0]]),
                               [2.0 - 2.0 * wd * lr - lr * 1.0], rtol=1e-14)
    assert optimizers.AdamW().weight_decay == 0.004
    with pytest.raises(ValueError, match="weight_decay=None"):
        optimizers.AdamW(weight_decay=None)


def test_weight_decay_exclusion_and_skipped_grads():
    opt = optimizers.SGD(0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(["bias"])
    kernel, bias, frozen = var([1.0], "kernel"), var([1.0], "bias"), var([1.0], "frozen")
    frozen.trainable = False
    kernel.grad, bias.grad, frozen.grad = np.zeros(1), np.zeros(1), np.ones(1)
    none_grad = var([1.0], "none")
    opt.apply([kernel, bias, frozen, none_grad])
    assert kernel.value[0] == pytest.approx(0.95) and bias.value[0] == 1.0
    assert frozen.value[0] == 1.0 and none_grad.value[0] == 1.0


def test_float32_variables_stay_float32():
    v = var([1.0, 2.0], dtype=np.float32)
    run(optimizers.Adam(0.1), v, [[1.0, 1.0]])
    assert v.dtype == np.float32
    assert optimizers.Adam().get_state()["iterations"].dtype == np.int64


def test_constraints_applied_after_update():
    v = var([0.05, 1.0], constraint=constraints.get("non_neg"))
    np.testing.assert_allclose(run(optimizers.SGD(0.1), v, [[1.0, 1.0]]), [0.0, 0.9])


def test_schedule_drives_learning_rate():
    opt = optimizers.SGD({"type": "step", "initial_learning_rate": 1.0, "decay_steps": 1,
                          "decay_rate": 0.5})
    assert opt.learning_rate == 1.0
    np.testing.assert_allclose(run(opt, var([0.0]), [[1.0], [1.0], [1.0]]), [-1.75])
    assert opt.learning_rate == 0.125


def test_state_round_trip_and_errors():
    def fresh():
        return var([1.0, 2.0], "k"), var([0.5], "b")

    opt = optimizers.Adam(0.1)
    k, b = fresh()
    for g in ([0.3, -0.1], [0.2, 0.4]):
        k.grad, b.grad = np.array(g), np.array([0.7])
        opt.apply([k, b])
    state = opt.get_state()
    assert set(state) == {"iterations", "layer/k/momentum", "layer/k/velocity",
                          "layer/b/momentum", "layer/b/velocity"}
    assert int(state["iterations"]) == 2
    assert all(isinstance(v, np.ndarray) for v in state.values())

    restored = optimizers.Adam(0.1)
    k2, b2 = var(k.numpy(), "k"), var(b.numpy(), "b")
    restored.build([k2, b2])
    restored.set_state(state)
    for o, vs in ((opt, (k, b)), (restored, (k2, b2))):
        vs[0].grad, vs[1].grad = np.array([-0.5, 0.1]), np.array([0.2])
        o.apply(list(vs))
    np.testing.assert_array_equal(k.value, k2.value)
    np.testing.assert_array_equal(b.value, b2.value)

    # set_state before build: slots are checked when the variables appear
    lazy = optimizers.Adam(0.1)
    lazy.set_state(state)
    assert lazy.iterations == 2
    with pytest.raises(ValueError, match="layer/k/momentum has shape"):
        lazy.build([var([1.0, 2.0, 3.0], "k")])

    bad = dict(state, **{"layer/k/momentum": np.zeros(3)})
    before = restored.get_state()
    with pytest.raises(ValueError, match=r"layer/k/momentum has shape \(3,\)"):
        restored.set_state(bad)
    assert all(np.array_equal(before[key], restored.get_state()[key]) for key in before)
    with pytest.raises(ValueError, match="lacks layer/b/'velocity'"):
        restored.set_state({key: v for key, v in state.items() if key != "layer/b/velocity"})
    with pytest.raises(ValueError, match="unexpected optimizer state entry 'layer/k/nope'"):
        restored.set_state(dict(state, **{"layer/k/nope": np.zeros(2)}))
    with pytest.raises(ValueError, match="unknown variable 'layer/zz'"):
        restored.set_state(dict(state, **{"layer/zz/momentum": np.zeros(1),
                                          "layer/zz/velocity": np.zeros(1)}))
    with pytest.raises(ValueError, match="lacks 'iterations'"):
        restored.set_state({})


def test_config_round_trip():
    for opt in (optimizers.SGD(0.2, momentum=0.5, nesterov=True, weight_decay=0.01),
                optimizers.Adam(schedules.CosineDecay(0.1, 100, warmup_steps=5)),
                optimizers.AdamW(0.003, amsgrad=True)):
        again = type(opt).from_config(opt.get_config())
        assert again.get_config() == opt.get_config()
    assert optimizers.SGD().get_config()["learning_rate"] == 0.01


def test_builders_and_argument_errors():
    opt = optimizers.get("SGD", learning_rate=0.5, momentum=0.9)
    assert isinstance(opt, optimizers.SGD) and opt.momentum == 0.9
    assert isinstance(optimizers.get({"type": "adamw", "learning_rate": 1e-3}),
                      optimizers.AdamW)
    assert optimizers.get(opt) is opt
    with pytest.raises(ValueError, match="unknown optimizer 'adm'.*did you mean 'adam'"):
        optimizers.get("adm")
    with pytest.raises(ValueError, match="bad arguments for optimizer 'sgd'.*momentom"):
        optimizers.get("sgd", momentom=0.9)
    with pytest.raises(ValueError, match="learning_rate=-0.1"):
        optimizers.SGD(-0.1)
    with pytest.raises(ValueError, match="momentum=1.0"):
        optimizers.SGD(momentum=1.0)
    with pytest.raises(ValueError, match="beta_2=1.5"):
        optimizers.Adam(beta_2=1.5)
    with pytest.raises(ValueError, match="weight_decay=-1"):
        optimizers.Adam(weight_decay=-1)


# --- clipping ----------------------------------------------------------------------------
def test_clip_by_global_norm():
    grads = [np.array([3.0, 0.0]), None, np.array([[4.0]], dtype=np.float32)]
    clipped, norm = optimizers.clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped[0], [0.6, 0.0])
    assert clipped[1] is None and clipped[2].dtype == np.float32
    np.testing.assert_allclose(clipped[2], [[0.8]])
    same, norm = optimizers.clip_by_global_norm(grads, 10.0)
    assert norm == pytest.approx(5.0) and same[0] is grads[0]
    inf, norm = optimizers.clip_by_global_norm([np.array([np.inf])], 1.0)
    assert math.isinf(norm) and np.isinf(inf[0][0])
    with pytest.raises(ValueError, match="max_norm=0"):
        optimizers.clip_by_global_norm(grads, 0)
    v = var([0.0, 0.0])
    v.grad = np.array([6.0, 8.0])
    assert optimizers.clip_gradients([v], 5.0) == pytest.approx(10.0)
    np.testing.assert_allclose(v.grad, [3.0, 4.0])


# --- schedules ---------------------------------------------------------------------------
def test_schedules_values():
    cos = schedules.CosineDecay(1.0, decay_steps=10, alpha=0.1, warmup_steps=5)
    assert cos(0) == 0.0 and cos(2) == pytest.approx(0.4) and cos(5) == 1.0
    assert cos(10) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cos(15) == pytest.approx(0.1) and cos(1000) == pytest.approx(0.1)
    plain = schedules.CosineDecay(2.0, decay_steps=4)
    assert plain(0) == 2.0 and plain(2) == pytest.approx(1.0) and plain(4) == 0.0
    step = schedules.StepDecay(0.1, decay_steps=3, decay_rate=0.5)
    assert [step(s) for s in (0, 2, 3, 7)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    const = schedules.Constant(0.4, warmup_steps=4, warmup_from=0.2)
    assert [const(s) for s in (0, 1, 4, 99)] == pytest.approx([0.2, 0.25, 0.4, 0.4])
    warm_step = schedules.StepDecay(1.0, decay_steps=2, decay_rate=0.5, warmup_steps=2)
    assert [warm_step(s) for s in (0, 1, 2, 3, 4)] == pytest.approx([0, 0.5, 1, 1, 0.5])


def test_schedule_builders_and_errors():
    assert isinstance(schedules.get(0.1), schedules.Constant)
    assert schedules.get("cosine", initial_learning_rate=1.0, decay_steps=5)(5) == 0.0
    s = schedules.get({"type": "step", "initial_learning_rate": 1.0, "decay_steps": 2})
    assert s(2) == pytest.approx(0.1)
    assert schedules.get(s) is s
    again = schedules.get({"type": s.type_name, **s.get_config()})
    assert again.get_config() == s.get_config()
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        schedules.get("cosin")
    with pytest.raises(ValueError, match="decay_steps=0"):
        schedules.CosineDecay(1.0, 0)
    with pytest.raises(ValueError, match="initial_learning_rate=-1"):
        schedules.StepDecay(-1, 10)
    with pytest.raises(ValueError, match="alpha=2"):
        schedules.CosineDecay(1.0, 10, alpha=2)
    with pytest.raises(ValueError, match="warmup_steps=-3"):
        schedules.Constant(1.0, warmup_steps=-3)
    with pytest.raises(ValueError, match="bad arguments for schedule 'constant'"):
        schedules.get("constant", lr=1.0)
    with pytest.raises(ValueError, match="step=-1"):
        schedules.Constant(1.0)(-1)


def test_losses_on_an_empty_batch():
    per, grad = losses.sparse_categorical_crossentropy(np.zeros((0, 3)), np.zeros(0, int))
    assert per.shape == (0,) and grad.shape == (0, 3)
    per, grad = losses.mean_squared_error(np.zeros((0, 2)), np.zeros((0, 2)))
    assert per.shape == (0,) and grad.shape == (0, 2)
    assert losses.accuracy(np.zeros((0, 3)), np.zeros(0, int)) == 0
