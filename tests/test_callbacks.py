"""`Trainer.fit(callbacks=...)` in one process: the hooks, their order and arguments,
the step's local sums `train_step()` returns, and the public surface tools measure
through (`has_moving_statistics`, `BatchNormalization.batch_moments`)."""

import io
import textwrap

import numpy as np
import pytest

import distbn
from distbn import LocalStrategy
from distbn.ops.batch_norm import local_mean_m2
from distbn.train import trainer
from distbn.train.callbacks import Callback, CallbackList
from distbn.train.config import parse_config

CONFIG = textwrap.dedent("""\
    seed: 4
    data: {name: patterns, n_train: 30, n_test: 11, image_size: 8}
    model:
      dtype: float64
      layers:
        - {type: Conv2D, filters: 3, kernel_size: 3, padding: same, use_bias: false}
        - {type: BatchNormalization, momentum: 0.8}
        - {type: ReLU}
        - {type: GlobalAveragePooling2D}
        - {type: Dense, units: 10}
    train:
      from_logits: true
      global_batch_size: 8   # 30 samples: batches of 8, 8, 8, 6
      steps: 7
      eval_every: 3
      optimizer: {name: sgd, learning_rate: 0.05}
    logging: {every_steps: 2, progress: none}
""")


class Recorder(Callback):
    """Notes every hook call with what it was given."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def on_train_begin(self, trainer):
        self.calls.append((self.name, "begin", trainer.step))

    def on_step_end(self, trainer, step, logs):
        assert step == trainer.step
        self.calls.append((self.name, "step", step, dict(logs)))

    def on_evaluate(self, trainer, step, metrics):
        assert step == trainer.step == metrics["step"]
        self.calls.append((self.name, "eval", step, dict(metrics)))

    def on_train_end(self, trainer, summary):
        self.calls.append((self.name, "end", summary))


def _trainer(overrides=()):
    return trainer.Trainer(parse_config(CONFIG, overrides=list(overrides)), LocalStrategy(),
                           out=io.StringIO())


def test_hooks_run_in_order_with_their_arguments():
    calls = []
    t = _trainer()
    summary = t.fit(callbacks=[Recorder("a", calls), Recorder("b", calls)])
    # Each hook runs for every callback, in the list's order, before the next hook.
    assert [c[0] for c in calls] == ["a", "b"] * (len(calls) // 2)
    mine = [c[1:] for c in calls if c[0] == "a"]
    kinds = [(c[0], c[1] if c[0] != "end" else None) for c in mine]
    assert kinds == [("begin", 0), ("step", 1), ("step", 2), ("step", 3), ("eval", 3),
                     ("step", 4), ("step", 5), ("step", 6), ("eval", 6), ("step", 7),
                     ("eval", 7), ("end", None)]
    assert mine[-1][1] is summary
    # The evaluations are the trainer's test records.
    tests = [r for r in t.history if r["split"] == "test"]
    assert [c[2] for c in mine if c[0] == "eval"] == tests
    assert mine[-2][2]["loss"] == summary["test_loss"]
    # Step logs: the step's local sums; 4 steps per epoch of 30 samples.
    steps = [c[2] for c in mine if c[0] == "step"]
    assert [s["samples"] for s in steps] == [8, 8, 8, 6, 8, 8, 8]
    for s in steps:
        assert set(s) >= {"epoch", "learning_rate", "grad_norm", "loss_sum", "correct",
                          "samples"}
        assert 0 <= s["correct"] <= s["samples"] and s["loss_sum"] > 0
    assert [s["epoch"] for s in steps] == [0, 0, 0, 0, 1, 1, 1]


def test_step_logs_sum_to_the_logged_training_loss():
    """The first epoch's train records equal the sums the step logs carry."""
    calls = []
    t = _trainer()
    t.fit(callbacks=[Recorder("a", calls)])
    steps = [c[3] for c in calls if c[1] == "step"]
    train = [r for r in t.history if r["split"] == "train"]
    assert train[0]["step"] == 2
    loss = sum(s["loss_sum"] for s in steps[:2])
    count = sum(s["samples"] for s in steps[:2])
    assert train[0]["loss"] == pytest.approx(loss / count + t.model.regularization_loss,
                                             rel=1e-12)
    assert train[0]["accuracy"] == pytest.approx(
        sum(s["correct"] for s in steps[:2]) / count, rel=1e-12)


def test_fit_without_callbacks_is_unchanged():
    a, b = _trainer(), _trainer()
    sa, sb = a.fit(), b.fit(callbacks=[Callback()])
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    for key in ("steps", "train_loss", "test_loss", "test_accuracy"):
        assert sa[key] == sb[key]
    for key, value in a.model.get_weight_dict().items():
        np.testing.assert_array_equal(value, b.model.get_weight_dict()[key], err_msg=key)


def test_a_callback_may_evaluate_and_read_batch_moments():
    """What `distbn compare` does: measure after each step, evaluate at the end."""

    class Probe(Callback):
        def on_train_begin(self, trainer):
            self.bn = [la for la in trainer.model.layers if la.has_moving_statistics]
            self.moments, self.extra = [], None

        def on_step_end(self, trainer, step, logs):
            self.moments.append(self.bn[0].batch_moments)

        def on_train_end(self, trainer, summary):
            self.extra = trainer.evaluate("train")

    probe = Probe()
    t = _trainer()
    t.fit(callbacks=[probe])
    assert [type(la).__name__ for la in probe.bn] == ["BatchNormalization"]
    assert all(m is not None for m in probe.moments)
    count, mean, m2 = probe.moments[3]
    assert count.tolist() == [6 * 8 * 8] * 3 and mean.shape == m2.shape == (3,)
    assert probe.extra["split"] == "train" and probe.extra["samples"] == 30
    # The model's last call was an evaluation (inference): no training moments now.
    assert probe.bn[0].batch_moments is None


def test_batch_moments_are_the_local_input_moments():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=2.0, size=(6, 5, 4)).astype(np.float32)
    bn = distbn.BatchNormalization(axis=-1)
    assert bn.batch_moments is None
    bn(x, training=True)
    for got, want in zip(bn.batch_moments, local_mean_m2(x, (0, 1)), strict=True):
        np.testing.assert_array_equal(got, want)
    mask = rng.random((6, 5)) > 0.3
    bn(x, training=True, mask=mask)
    count, mean, _ = bn.batch_moments
    assert count.tolist() == [float(mask.sum())] * 4
    np.testing.assert_allclose(mean, x[mask].mean(axis=0, dtype=np.float64), rtol=1e-6)
    ghost = distbn.BatchNormalization(virtual_batch_size=2)
    ghost(x, training=True)  # pooled over the ghost batches: the whole local batch's
    for got, want in zip(ghost.batch_moments, local_mean_m2(x, (0, 1)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10)
    bn(x, training=False)
    assert bn.batch_moments is None
    bn(x, training=True)
    bn.trainable = False
    bn(x, training=True)  # frozen: inference
    assert bn.batch_moments is None


def test_moving_statistics_are_a_class_attribute():
    assert distbn.BatchNormalization.has_moving_statistics is True
    assert distbn.Layer.has_moving_statistics is False
    assert distbn.layers.Dense.has_moving_statistics is False

    class MyBN(distbn.BatchNormalization):
        pass

    assert MyBN(name="renamed").has_moving_statistics  # a subclass, whatever its name


def test_callback_list_rejects_what_has_no_hooks():
    with pytest.raises(TypeError, match=r"callbacks\[1\] must be a distbn.train.callbacks"):
        CallbackList([Callback(), object()])
    assert CallbackList(None).callbacks == []
