"""PreciseBN (`distbn.train.precise_bn`), one process: population statistics by hand in
float64, frozen weights, layers in order, masks, renorm, ghost batches, errors."""

import numpy as np
import pytest

import distbn
import distbn.random
from distbn.train.precise_bn import ScheduleBatches, bn_passes, recompute_bn_statistics

F64 = "float64"


def _two_bn_model(seed=0, build=True):
    distbn.random.set_seed(seed)
    model = distbn.Sequential([
        distbn.Dense(5, dtype=F64, name="d1"),
        distbn.BatchNormalization(dtype=F64, name="bn1"),
        distbn.ReLU(dtype=F64, name="r1"),
        distbn.Dropout(0.5, dtype=F64, name="drop"),
        distbn.Dense(3, dtype=F64, name="d2"),
        distbn.BatchNormalization(dtype=F64, name="bn2"),
    ])
    if build:  # now, so that the seed alone decides the weights
        model.build((None, 7))
    return model


def _batches(n=4, size=6, features=7, seed=1):
    rng = np.random.default_rng(seed)
    # A large offset: a shifted-sum variance would lose digits here, the centred M2 not.
    return [rng.normal(50.0, 3.0, size=(size, features)) for _ in range(n)]


def _dense(layer, x):
    return x @ layer.kernel.numpy() + layer.bias.numpy()


def _bn(x, mean, var, layer):
    return ((x - mean) / np.sqrt(var + layer.epsilon) * layer.gamma.numpy()
            + layer.beta.numpy())


def test_two_layers_equal_the_population_statistics_by_hand():
    model = _two_bn_model()
    xs = _batches()
    model(xs[0])  # build
    d1, bn1, _, _, d2, bn2 = model.layers
    old_mean1 = bn1.moving_mean.numpy()
    summary = recompute_bn_statistics(model, xs, len(xs))
    x = np.concatenate(xs)
    h1 = _dense(d1, x)
    mean1, var1 = h1.mean(axis=0), h1.var(axis=0)  # biased, as Keras
    np.testing.assert_allclose(bn1.moving_mean.numpy(), mean1, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), var1, rtol=1e-12)
    # Layers in order: bn2's inputs are normalised with bn1's *new* statistics (and no
    # Dropout: inference mode).
    h2 = _dense(d2, np.maximum(_bn(h1, mean1, var1, bn1), 0.0))
    np.testing.assert_allclose(bn2.moving_mean.numpy(), h2.mean(axis=0), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(bn2.moving_variance.numpy(), h2.var(axis=0), rtol=1e-12)
    # ... which differs from what one forward with bn1's old statistics would give.
    stale = _dense(d2, np.maximum(_bn(h1, old_mean1, np.ones(5), bn1), 0.0))
    assert np.abs(stale.mean(axis=0) - h2.mean(axis=0)).max() > 1e-3
    assert set(summary) == {"bn1", "bn2"}
    assert summary["bn1"]["count"] == summary["bn2"]["count"] == x.shape[0]
    assert summary["bn1"]["pass"] == 0 and summary["bn2"]["pass"] == 1
    assert summary["bn1"]["mean_change"] == pytest.approx(np.abs(mean1 - old_mean1).max())


def test_weights_stay_frozen_and_the_result_does_not_depend_on_the_ema():
    model = _two_bn_model()
    xs = _batches()
    for x in xs:  # some EMA history first
        model(x, training=True)
    trainable = {k: w.numpy() for k, w in model.named_weights().items() if w.trainable}
    recompute_bn_statistics(model, xs, len(xs))
    first = model.get_weight_dict()
    for key, value in trainable.items():
        np.testing.assert_array_equal(first[key], value, err_msg=key)
    # A second run starts from the recomputed statistics and lands on the same ones.
    recompute_bn_statistics(model, xs, len(xs))
    for key, value in model.get_weight_dict().items():
        np.testing.assert_allclose(value, first[key], rtol=1e-12, atol=1e-12, err_msg=key)
    # The layers' own methods are back (the pass wraps them only while it runs).
    assert all("call" not in vars(la) for la in model.layers)


def test_num_batches_takes_a_prefix_and_a_one_shot_iterator_works():
    xs = _batches(n=5)
    a, b = _two_bn_model(), _two_bn_model()
    a(xs[0])
    b(xs[0])
    recompute_bn_statistics(a, xs[:3], 3)
    recompute_bn_statistics(b, iter(xs), 3)  # read once, kept for both passes
    for key, value in a.get_weight_dict().items():
        np.testing.assert_array_equal(value, b.get_weight_dict()[key], err_msg=key)


def test_an_unbuilt_model_is_built_from_the_first_batch():
    xs = _batches()
    model = _two_bn_model(build=False)
    summary = recompute_bn_statistics(model, xs, len(xs))
    assert model.built and set(summary) == {"bn1", "bn2"}


def test_parallel_branches_share_a_pass_with_the_same_result():
    def build():
        distbn.random.set_seed(3)
        return distbn.Model([
            distbn.Dense(4, dtype=F64, name="stem"),
            distbn.BatchNormalization(dtype=F64, name="bn_stem"),
            distbn.Dense(4, dtype=F64, name="a"),
            distbn.BatchNormalization(dtype=F64, name="bn_a"),
            distbn.Dense(4, dtype=F64, name="b"),
            distbn.BatchNormalization(dtype=F64, name="bn_b"),
            distbn.Add(dtype=F64, name="add"),
            distbn.BatchNormalization(dtype=F64, name="bn_out"),
        ], inputs={"b": ["bn_stem"], "add": ["bn_a", "bn_b"]})

    model = build()
    xs = _batches(features=3)
    model(xs[0])
    assert [[la.name for la in g] for g in bn_passes(model)] == [
        ["bn_stem"], ["bn_a", "bn_b"], ["bn_out"]]
    recompute_bn_statistics(model, xs, len(xs))
    # Reference: one layer at a time, each over the full forward of the model so far.
    ref = build()
    ref(xs[0])
    x = np.concatenate(xs)
    for name in ("bn_stem", "bn_a", "bn_b", "bn_out"):
        layer = ref.get_layer(name)
        inputs = {}
        for la, out in ref.layer_outputs(x, training=False):
            inputs[la.name] = out
        src = {"bn_stem": "stem", "bn_a": "a", "bn_b": "b", "bn_out": "add"}[name]
        layer.moving_mean.assign(inputs[src].mean(axis=0))
        layer.moving_variance.assign(inputs[src].var(axis=0))
    for key, value in ref.get_weight_dict().items():
        np.testing.assert_allclose(model.get_weight_dict()[key], value, rtol=1e-12,
                                   atol=1e-12, err_msg=key)


def test_masked_positions_stay_out_of_the_statistics():
    distbn.random.set_seed(0)
    model = distbn.Sequential([distbn.Dense(3, dtype=F64, name="d"),
                               distbn.BatchNormalization(dtype=F64, name="bn"),
                               distbn.GlobalAveragePooling1D(name="pool")])
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(4, 5, 2)) for _ in range(3)]
    masks = [rng.random((4, 5)) > 0.4 for _ in range(3)]
    for x, m in zip(xs, masks, strict=True):
        x[~m] = 1e6  # huge values under the mask: they must not count
    recompute_bn_statistics(model, list(zip(xs, masks, strict=True)), 3)
    h = _dense(model.get_layer("d"), np.concatenate(xs))[np.concatenate(masks)]
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(axis=0), rtol=1e-12)


def test_renorm_and_ghost_batches_get_the_population_statistics():
    distbn.random.set_seed(0)
    model = distbn.Sequential([
        distbn.BatchNormalization(dtype=F64, renorm=True, name="rn"),
        distbn.BatchNormalization(dtype=F64, virtual_batch_size=2, name="ghost"),
    ])
    xs = _batches(n=3, size=4, features=3)
    for x in xs:
        model(x, training=True)
    recompute_bn_statistics(model, xs, 3)
    x = np.concatenate(xs)
    rn, ghost = model.layers
    mean, var = x.mean(axis=0), x.var(axis=0)
    for got, want in ((rn.moving_mean, mean), (rn.renorm_mean, mean), (rn.moving_variance, var),
                      (rn.moving_stddev, np.sqrt(var + rn.epsilon)),
                      (rn.renorm_stddev, np.sqrt(var + rn.epsilon))):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, err_msg=got.name)
    h = _bn(x, mean, var, rn)
    np.testing.assert_allclose(ghost.moving_mean.numpy(), h.mean(axis=0), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), h.var(axis=0), rtol=1e-10)


def test_frozen_bn_and_norm_layers_without_moving_statistics_are_left_alone():
    distbn.random.set_seed(0)
    frozen = distbn.BatchNormalization(dtype=F64, trainable=False, name="frozen")
    model = distbn.Sequential([frozen, distbn.LayerNormalization(dtype=F64, name="ln")])
    xs = _batches(n=2)
    model(xs[0])
    before = model.get_weight_dict()
    assert recompute_bn_statistics(model, xs, 2) == {}
    for key, value in model.get_weight_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_num_batches_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=rf"num_batches must be an int >= 1, got num_batches="
                                         rf"{bad!r}".replace("(", r"\(").replace(")", r"\)")):
        recompute_bn_statistics(_two_bn_model(), _batches(), bad)


def test_too_few_batches_names_the_counts_and_changes_nothing():
    model = _two_bn_model()
    xs = _batches(n=2)
    model(xs[0])
    before = model.get_weight_dict()
    with pytest.raises(ValueError, match=r"fewer than num_batches=5 items on 1 of 1 "
                                         r"replica\(s\); this replica's yielded 2"):
        recompute_bn_statistics(model, xs, 5)
    for key, value in model.get_weight_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_a_failing_second_pass_restores_every_statistic():
    model = _two_bn_model()
    xs = _batches()
    model(xs[0])
    before = model.get_weight_dict()

    class BadLater:  # the second pass reads a batch of the wrong width
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            for k, x in enumerate(xs):
                yield x[:, :3] if self.passes == 2 and k == 1 else x

    with pytest.raises(ValueError):
        recompute_bn_statistics(model, BadLater(), len(xs))
    for key, value in model.get_weight_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    assert all("call" not in vars(la) for la in model.layers)


def test_an_item_that_is_not_an_input_is_named():
    with pytest.raises(TypeError, match=r"batches item 0: expected an input array or an "
                                        r"\(x, mask\) pair, got a tuple of length 3"):
        recompute_bn_statistics(_two_bn_model(), [(1, 2, 3)], 1)


def test_schedule_batches_are_the_trainers_global_batches_sharded():
    x = np.arange(23 * 2, dtype=np.float64).reshape(23, 2)
    mask = np.arange(23)[:, None] % 2 == np.zeros((1, 4))
    one = list(ScheduleBatches(x, None, 5, 7, False, 6, 0, 1))
    assert len(one) == 6 and [len(b) for b in one] == [5, 5, 5, 5, 3, 5]  # into epoch 1
    parts = [list(ScheduleBatches(x, mask, 5, 7, False, 6, r, 3)) for r in range(3)]
    for k in range(6):
        np.testing.assert_array_equal(np.concatenate([p[k][0] for p in parts]), one[k])
        assert parts[2][k][1].shape == (len(parts[2][k][0]), 4)
    assert list(ScheduleBatches(x, None, 5, 7, False, 6, 0, 1))[0].tolist() == one[0].tolist()


TRAIN = """\
seed: 3
data: {name: patterns, n_train: 30, n_test: 11, image_size: 6}
model:
  dtype: float64
  layers:
    - {type: Conv2D, filters: 3, kernel_size: 3, padding: same, use_bias: false}
    - {type: BatchNormalization, momentum: 0.9}
    - {type: ReLU}
    - {type: GlobalAveragePooling2D}
    - {type: Dense, units: 6}
    - {type: BatchNormalization, momentum: 0.9}
    - {type: Dense, units: 10}
train:
  from_logits: true
  global_batch_size: 8
  steps: 5
  optimizer: {name: sgd, learning_rate: 0.1}
logging: {every_steps: 5, progress: none}
"""


def _fit(overrides=()):
    import io

    from distbn.train.config import parse_config
    from distbn.train.trainer import Trainer

    t = Trainer(parse_config(TRAIN, overrides=list(overrides)), distbn.LocalStrategy(),
                out=io.StringIO())
    t.fit()
    return t


def test_trainer_option_recomputes_before_the_evaluation_and_keeps_the_result():
    precise = _fit(["train.precise_bn={batches: 6}"])  # 6 batches of 8 > 30: into epoch 1
    plain = _fit()
    w_precise, w_plain = precise.model.get_weight_dict(), plain.model.get_weight_dict()
    for key, value in w_plain.items():  # plain BN: the statistics never touch the weights
        if "moving" not in key:
            np.testing.assert_array_equal(w_precise[key], value, err_msg=key)
    assert any(np.abs(w_precise[k] - w_plain[k]).max() > 1e-6 for k in w_plain if "moving" in k)
    # The same recomputation by hand on the schedule's first 6 global batches.
    from distbn.train.data import BatchSchedule

    schedule = BatchSchedule(30, 8, 3)
    x = plain.dataset.x_train
    summary = recompute_bn_statistics(plain.model, [x[schedule.batch_at(k)[2]]
                                                    for k in range(6)], 6)
    assert len(summary) == 2
    for key, value in plain.model.get_weight_dict().items():
        np.testing.assert_allclose(w_precise[key], value, rtol=1e-12, atol=1e-12, err_msg=key)
    # The final evaluation used them.
    record = plain.evaluate("test")
    assert precise.history[-1]["split"] == "test"
    assert precise.history[-1]["loss"] == pytest.approx(record["loss"], rel=1e-12)


# --- distbn recalibrate ------------------------------------------------------------------

RUN_CONFIG = TRAIN.replace("steps: 5", "steps: 4").replace(
    "  dtype: float64\n", "  dtype: float64\n  synchronized: false\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import io

    from distbn.train import command

    root = tmp_path_factory.mktemp("recalibrate")
    (root / "cfg.yaml").write_text(RUN_CONFIG)
    err = io.StringIO()
    code = command.run(root / "cfg.yaml", run_dir=str(root / "run"),
                       strategy=distbn.LocalStrategy(), out=io.StringIO(), err=err)
    assert code == 0, err.getvalue()
    return root / "run"


def _npz(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _cli(args, capsys):
    from distbn.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_recalibrate_writes_model_precise_npz_and_refuses_to_overwrite(run_dir, capsys):
    from distbn.train import inference

    code, out, err = _cli(["recalibrate", run_dir, "--batches", 4], capsys)
    assert code == 0, err
    target = run_dir / inference.PRECISE_FILE
    assert f"wrote {target}" in out and "precise_bn: pass 2/2" in err
    got = _npz(target)
    # The same as the Python API on the run's model and its first 4 training batches.
    trainer = inference.prepare_evaluation(run_dir, distbn.LocalStrategy())
    x = trainer.dataset.x_train
    from distbn.train.data import BatchSchedule

    schedule = BatchSchedule(len(x), 8, 3)
    recompute_bn_statistics(trainer.model, [x[schedule.batch_at(k)[2]] for k in range(4)], 4)
    want = trainer.model.get_weight_dict()
    assert set(got) == set(want) == set(_npz(run_dir / "model.npz"))
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-12, err_msg=key)
    # An existing output is kept: exit 2 and nothing written.
    stamp = target.stat().st_mtime_ns
    code, _, err = _cli(["recalibrate", run_dir, "--batches", 2], capsys)
    assert code == 2 and "model.precise.npz exists; pass --overwrite" in err
    assert target.stat().st_mtime_ns == stamp
    # evaluate --weights evaluates the recalibrated file.
    code, out, err = _cli(["evaluate", run_dir, "--weights", target, "--json"], capsys)
    assert code == 0, err
    import json

    assert json.loads(out)["loss"] == pytest.approx(trainer.evaluate()["loss"], rel=1e-12)


@pytest.mark.parametrize("args,message", [
    (["--batches", 0], "--batches must be >= 1, got --batches 0"),
    (["--batches", 2, "--out", "NOWHERE/x.npz"], "--out NOWHERE/x.npz: its directory does "
                                                 "not exist"),
])
def test_recalibrate_bad_input_exits_2_and_writes_nothing(run_dir, capsys, args, message):
    code, _, err = _cli(["recalibrate", run_dir, *args], capsys)
    assert code == 2 and message in err, err
    code, _, err = _cli(["recalibrate", run_dir.parent / "nowhere", "--batches", 1], capsys)
    assert code == 2 and "is not a run directory" in err


def test_recalibrate_at_two_ranks_writes_what_one_process_writes(run_dir, tmp_path, capsys):
    from mpi_driver import run_mpi

    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    code, _, err = _cli(["recalibrate", run_dir, "--batches", 5, "--out", one], capsys)
    assert code == 0, err
    res = run_mpi(2, ["-m", "distbn", "recalibrate", str(run_dir), "--batches", "5", "--out",
                      str(two)], timeout=90)
    assert res.returncode == 0, res.failure_report()
    got, want = _npz(two), _npz(one)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-12, err_msg=key)
    # Bad input at 2 ranks: both exit 2 together (no hang), one message, nothing written.
    again = run_mpi(2, ["-m", "distbn", "recalibrate", str(run_dir), "--batches", "1",
                        "--out", str(two)], timeout=90)
    assert again.returncode == 2 and again.output.count("exists; pass --overwrite") == 1, \
        again.failure_report()
    np.testing.assert_array_equal(_npz(two)["batch_normalization/moving_mean"],
                                  got["batch_normalization/moving_mean"])
