"""The trainer in one process: model building from config, run directory, exit codes,
bucketed gradient packing, and the quickstart learning on a tiny budget."""

import io
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from distbn import LocalStrategy
from distbn.train import builder, command, trainer
from distbn.train.buckets import Buckets, GradientAllReduce
from distbn.train.config import ConfigError, config_hash, load_config, parse_config
from distbn.train.rundir import check_run_dir, default_run_dir

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

TINY = textwrap.dedent("""\
    seed: 3
    data: {name: patterns, n_train: 48, n_test: 20, image_size: 8}
    model:
      dtype: float64
      synchronized: false
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same}
        - {type: BatchNormalization}
        - {type: BatchNormalization, synchronized: true, momentum: 0.5}
        - {type: ReLU}
        - {type: GlobalAveragePooling2D}
        - {type: Dense, units: 10, kernel_regularizer: l2}
    train:
      from_logits: true  # the last Dense outputs logits
      global_batch_size: 10
      steps: 7
      optimizer: {name: sgd, learning_rate: 0.05}
    logging: {every_steps: 3, progress: lines}
""")


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def run_quiet(*args, **kwargs):
    out, err = io.StringIO(), io.StringIO()
    code = command.run(*args, out=out, err=err, strategy=LocalStrategy(), **kwargs)
    return code, out.getvalue(), err.getvalue()


# --- building from config ----------------------------------------------------------------


def _line_of(text, needle):
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("entry, needle, key", [
    ("{type: BatchNormalization, momentun: 0.9}", "did you mean 'momentum'?",
     "model.layers[1].momentun"),
    ("{type: Conv2d, filters: 3, kernel_size: 3}", "did you mean 'Conv2D'",
     "model.layers[1].type"),
    ("{type: BatchNormalization, momentum: 1.5}", "got momentum=1.5",
     "model.layers[1].momentum"),
    ("{type: Dense, units: 3, dtype: float32}", "model.dtype", "model.layers[1].dtype"),
])
def test_builder_errors_quote_the_yaml_line(tmp_path, entry, needle, key):
    text = TINY.replace("- {type: BatchNormalization}", "- " + entry)
    path = write(tmp_path, text)
    config = load_config(path)
    with pytest.raises(ConfigError) as info:
        builder.build_model(config, (8, 8, 3), 10)
    message = str(info.value)
    assert message.startswith(f"{path}:{_line_of(text, entry)}: {key}: "), message
    assert needle in message


def test_builder_error_from_an_override_names_the_override(tmp_path):
    config = load_config(write(tmp_path, TINY), ["model.layers.1.center=maybe"])
    with pytest.raises(ConfigError, match=r"^--set model.layers.1.center=maybe: "
                                          r"model.layers\[1\].center: "):
        builder.build_model(config, (8, 8, 3), 10)


def test_builder_output_must_match_the_classes(tmp_path):
    config = load_config(write(tmp_path, TINY), ["data.num_classes=7"])
    with pytest.raises(ConfigError, match=r"model.layers\[5\]: the model's output shape "
                                          r"is \(None, 10\), but the data have 7 classes"):
        builder.build_model(config, (8, 8, 3), 7)


def test_builder_applies_model_defaults(tmp_path):
    text = TINY.replace("data_format", "x").replace(
        "  synchronized: false", "  synchronized: false\n  data_format: channels_first")
    config = load_config(write(tmp_path, text))
    model = builder.build_model(config, (3, 8, 8), 10, strategy=LocalStrategy())
    conv, bn, bn_sync = model.layers[:3]
    assert bn.synchronized is False  # model.synchronized
    assert bn_sync.synchronized is True  # set in the entry
    assert conv.data_format == "channels_first"
    assert model.layers[4].data_format == "channels_first"
    assert {w.dtype for w in model.weights} == {np.dtype("float64")}
    # Names are per model, so model.npz keys do not depend on earlier builds.
    again = builder.build_model(config, (3, 8, 8), 10)
    assert [la.name for la in model.layers] == [la.name for la in again.layers] == [
        "conv2d", "batch_normalization", "batch_normalization_1", "re_lu",
        "global_average_pooling2d", "dense"]
    flipped = load_config(write(tmp_path, text), ["model.synchronized=true"])
    assert builder.build_model(flipped, (3, 8, 8), 10).layers[1].synchronized is True


def test_same_seed_same_initial_weights(tmp_path):
    config = load_config(write(tmp_path, TINY))
    a = builder.build_model(config, (8, 8, 3), 10).get_weight_dict()
    b = builder.build_model(config, (8, 8, 3), 10).get_weight_dict()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_optimizer_and_schedule_from_config():
    cfg = parse_config(TINY, overrides=[
        "train.optimizer.schedule={name: cosine, warmup_steps: 10}",
        "train.optimizer.learning_rate=0.2", "train.optimizer.nesterov=true"])
    opt = builder.build_optimizer(cfg.train.optimizer, 110)
    assert type(opt).__name__ == "SGD" and opt.nesterov and opt.momentum == 0.9
    assert opt.schedule.decay_steps == 100  # null: the rest of training after warm-up
    assert opt.schedule(10) == pytest.approx(0.2) and opt.schedule(110) == pytest.approx(0.0)
    adam = parse_config(TINY, overrides=["train.optimizer={name: adamw, weight_decay: 0.01, "
                                         "beta_2: 0.99}"])
    opt = builder.build_optimizer(adam.train.optimizer, 5)
    assert type(opt).__name__ == "AdamW" and opt.weight_decay == 0.01 and opt.beta_2 == 0.99
    step = parse_config(TINY, overrides=[
        "train.optimizer.schedule={name: step, decay_steps: 3, decay_rate: 0.5}"])
    sched = builder.build_schedule(step.train.optimizer, 100)
    assert sched(2) == pytest.approx(0.05) and sched(3) == pytest.approx(0.025)


# --- buckets ---------------------------------------------------------------------------------


def test_buckets_layout_and_round_trip():
    shapes = [(3, 4), (5,), (2, 2), (1000,), (7,)]
    dtypes = ["float32", "float64", "float32", "float32", "float64"]
    b = Buckets(shapes, dtypes, bucket_bytes=64)
    assert [buf.dtype for buf in b.buffers].count(np.float32) >= 2  # split by size
    assert all(buf.dtype in (np.float32, np.float64) for buf in b.buffers)
    arrays = [np.random.default_rng(i).standard_normal(s).astype(d)
              for i, (s, d) in enumerate(zip(shapes, dtypes, strict=True))]
    b.pack(arrays)
    for a, v in zip(arrays, b.views(), strict=True):
        np.testing.assert_array_equal(a, v)
        assert v.dtype == a.dtype
    one = Buckets(shapes, dtypes)  # default: one bucket per dtype
    assert len(one.buffers) == 2


def test_gradient_all_reduce_is_a_no_op_for_one_replica():
    from distbn.layers.base import Variable

    v = Variable(np.ones(3), "w")
    v.grad = np.arange(3.0)
    reduce = GradientAllReduce(LocalStrategy(), [v])
    reduce()
    assert reduce.num_buckets == 0
    np.testing.assert_array_equal(v.grad, [0, 1, 2])


# --- the run directory -----------------------------------------------------------------------


def test_run_writes_the_run_directory(tmp_path):
    cfg = write(tmp_path, TINY)
    run_dir = tmp_path / "out"
    code, out, err = run_quiet(cfg, ["train.eval_every=4"], run_dir=str(run_dir))
    assert code == 0, err
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.yaml", "metrics.jsonl", "model.npz"]
    # config.yaml is the resolved config: it parses back to the same config.
    resolved = load_config(run_dir / "config.yaml")
    assert config_hash(resolved) == config_hash(load_config(cfg, ["train.eval_every=4"]))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    assert [r["step"] for r in train] == [3, 6, 7]  # every 3 steps, and the last
    assert [r["step"] for r in test] == [4, 7]  # eval_every 4, and at the end
    for r in train:
        assert set(r) >= {"step", "epoch", "loss", "accuracy", "learning_rate",
                          "samples_per_sec", "wall_time"}
        assert np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 and r["samples_per_sec"] > 0
    assert train[-1]["epoch"] == 1  # step 7 of 5-step epochs (48 samples, batch 10)
    assert test[-1]["samples"] == 20 and set(test[-1]) >= {"loss", "accuracy", "wall_time"}
    with np.load(run_dir / "model.npz", allow_pickle=False) as npz:
        weights = {k: npz[k] for k in npz.files}
    assert all(w.dtype == np.float64 for w in weights.values())
    model = builder.build_model(resolved, (8, 8, 3), 10)
    assert set(weights) == set(model.get_weight_dict())
    assert "batch_normalization/moving_mean" in weights and "dense/kernel" in weights
    # The summary and the progress lines.
    assert "[rank 0] step 3/7 epoch 0 loss " in out and " samples/s" in out
    assert "[rank 0] test  loss" in out and "(20 samples)" in out
    assert err == ""


def test_run_dir_that_is_a_file_exits_2_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, TINY)
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    for target in (blocker, blocker / "sub"):
        code, out, err = run_quiet(cfg, run_dir=str(target))
        assert code == 2
        assert err.count("distbn train: error: run directory") == 1, err
        assert str(target) in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert blocker.read_text() == "keep me"


def test_config_error_exits_2_once_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, TINY.replace("- {type: ReLU}", "- {type: ReLu}"))
    code, out, err = run_quiet(cfg)
    assert code == 2 and out == ""
    assert err.count("distbn train: error:") == 1
    assert f"{cfg}:{_line_of(TINY, '{type: ReLU}')}: model.layers[3].type" in err
    assert not (tmp_path / "runs").exists()


def test_default_run_dir(tmp_path):
    import datetime

    now = datetime.datetime(2024, 5, 6, 7, 8, 9)
    first = default_run_dir("configs/quickstart.yaml", root=str(tmp_path), now=now)
    assert first == str(tmp_path / "quickstart-20240506-070809")
    Path(first).mkdir()
    assert default_run_dir("quickstart.yaml", root=str(tmp_path), now=now).endswith("-2")
    assert check_run_dir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")


def _snapshot(run_dir):
    """{relative path: bytes} of every file under a run directory."""
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_identical_rerun_replaces_a_previous_run(tmp_path):
    cfg = write(tmp_path, TINY)
    run_dir = tmp_path / "out"
    assert run_quiet(cfg, run_dir=str(run_dir))[0] == 0
    code, _, err = run_quiet(cfg, run_dir=str(run_dir))
    assert code == 0 and "replaced config.yaml, metrics.jsonl, model.npz" in err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [3, 6, 7, 7]  # this run's records only


def test_another_config_into_a_used_run_dir_is_refused_and_writes_nothing(tmp_path):
    cfg = write(tmp_path, TINY)
    run_dir = tmp_path / "out"
    assert run_quiet(cfg, run_dir=str(run_dir))[0] == 0
    before = _snapshot(run_dir)
    code, out, err = run_quiet(cfg, ["train.steps=2"], run_dir=str(run_dir))
    assert code == 2 and out == ""
    assert "holds another run (config.yaml, metrics.jsonl, model.npz)" in err
    assert "train.steps (7 -> 2)" in err and "--overwrite" in err
    assert _snapshot(run_dir) == before
    code, _, err = run_quiet(cfg, ["train.steps=2"], run_dir=str(run_dir), overwrite=True)
    assert code == 0 and "replaced config.yaml, metrics.jsonl, model.npz" in err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [2, 2]  # the train record and the evaluation of this run only


def test_another_model_into_a_run_dir_with_checkpoints_is_refused_and_writes_nothing(
        tmp_path):
    """The new-user report: a second model into a used directory replaced config.yaml,
    deleted model.npz, then failed with exit 2 on the checkpoint."""
    cfg = write(tmp_path, TINY)
    run_dir = tmp_path / "out"
    every = ["checkpoint.every_steps=3"]
    assert run_quiet(cfg, every, run_dir=str(run_dir))[0] == 0
    before = _snapshot(run_dir)
    assert any(k.startswith("checkpoints/") for k in before)
    code, out, err = run_quiet(cfg, [*every, "model.layers.0.filters=5"], run_dir=str(run_dir))
    assert code == 2 and out == ""
    assert "holds another run" in err and "checkpoints at steps 3, 6, 7" in err
    assert "model.layers.0.filters (4 -> 5)" in err
    assert "does not fit this model" in err and "conv2d/kernel" in err
    assert "Nothing was changed" in err and "--overwrite" in err
    assert _snapshot(run_dir) == before
    code, _, err = run_quiet(cfg, [*every, "model.layers.0.filters=5"], run_dir=str(run_dir),
                             overwrite=True)
    assert code == 0 and "checkpoints/" in err
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["layers"][0]["filters"] == 5


def test_resume_of_the_same_run_with_more_steps(tmp_path):
    cfg = write(tmp_path, TINY)
    run_dir = tmp_path / "out"
    every = ["checkpoint.every_steps=3", "train.steps=6"]
    assert run_quiet(cfg, every, run_dir=str(run_dir))[0] == 0
    code, out, err = run_quiet(cfg, ["checkpoint.every_steps=3", "train.steps=7"],
                               run_dir=str(run_dir))
    assert code == 0, err
    assert "resumed from step 6" in out and "train.steps (6 -> 7)" in err


class _TwoRankView(LocalStrategy):
    """Rank 0 of a pretend 2-rank world whose rank 1 resolved a different config."""

    num_replicas_in_sync = 2

    def allgather_object(self, obj, name=None):
        if name == "train.config":
            problem, digest, path = obj
            return [obj, (problem, "f" * 64, None)]
        return [obj, obj]


def test_config_hash_mismatch_names_the_ranks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    code = command.run(write(tmp_path, TINY), strategy=_TwoRankView(), err=err,
                       out=io.StringIO())
    assert code == 2
    text = err.getvalue()
    assert "different resolved configs" in text and "rank(s) 1: sha256 ffffffffffff" in text
    assert not (tmp_path / "runs").exists()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # reported once, not by numpy
def test_diverging_run_fails_with_exit_1(tmp_path):
    cfg = write(tmp_path, TINY.replace("learning_rate: 0.05", "learning_rate: 1e30"))
    code, _, err = run_quiet(cfg, run_dir=str(tmp_path / "out"))
    assert code == 1 and "non-finite gradient norm" in err
    assert not (tmp_path / "out" / "model.npz").exists()


def test_replica_local_bn_statistics_average_is_identity_on_one_rank(tmp_path):
    config = load_config(write(tmp_path, TINY))
    t = trainer.Trainer(config, LocalStrategy(), out=io.StringIO())
    summary = t.fit()
    assert summary["steps"] == 7 and summary["model_file"] is None
    assert [r["split"] for r in t.history].count("test") == 1


# --- learning ----------------------------------------------------------------------------


def test_quickstart_learns_on_a_tiny_budget(tmp_path):
    # 60 steps on 2000 samples: seeds 0-5 measured 41-56% test accuracy (chance: 10%).
    code, out, err = run_quiet(
        QUICKSTART, ["train.steps=60", "data.n_train=2000", "data.n_test=500",
                     "logging.progress=none"], run_dir=str(tmp_path / "q"))
    assert code == 0, err
    final = [json.loads(line) for line in (tmp_path / "q" / "metrics.jsonl").open()][-1]
    assert final["split"] == "test" and final["samples"] == 500
    assert final["accuracy"] > 0.25, final
    config = yaml.safe_load((tmp_path / "q" / "config.yaml").read_text())
    assert config["model"]["synchronized"] is True and config["train"]["steps"] == 60


# --- progress --------------------------------------------------------------------------------


def test_progress_modes(monkeypatch):
    from distbn.train import progress

    monkeypatch.delenv(progress.TTY_ENV, raising=False)
    kind = lambda *a, **k: type(progress.make_progress(*a, **k)).__name__  # noqa: E731
    assert kind("auto", 0, 10) == "LineProgress"  # stderr is not a terminal under pytest
    assert kind("lines", 0, 10) == "LineProgress"
    assert kind("none", 0, 10) == "Progress"
    assert kind("lines", 1, 10) == "Progress"  # other ranks are quiet ...
    assert kind("none", 1, 10, verbose=True) == "LineProgress"  # ... unless --verbose
    if progress.tqdm_available():
        monkeypatch.setenv(progress.TTY_ENV, "1")  # what `distbn launch` sets on a terminal
        assert kind("auto", 0, 10) == "BarProgress"
        assert kind("bar", 0, 10) == "BarProgress"
    monkeypatch.setattr(progress, "tqdm_available", lambda: False)
    assert kind("bar", 0, 10) == "LineProgress"
    line = progress.format_step(0, 40, 390, {"epoch": 1, "loss": 1.23, "accuracy": 0.56,
                                             "learning_rate": 0.049, "samples_per_sec": 1234})
    assert line == ("[rank 0] step 40/390 epoch 1 loss 1.2300 acc 0.5600 lr 0.049 "
                    "1234 samples/s")


def test_bar_progress_runs(tmp_path, capsys):
    pytest.importorskip("tqdm")
    code, out, _ = run_quiet(write(tmp_path, TINY), ["logging.progress=bar"],
                             run_dir=str(tmp_path / "o"))
    assert code == 0
    assert "[rank 0] train" in capsys.readouterr().err  # the bar, on stderr
    assert "step 3/7" not in out and "[rank 0] test  loss" in out


def test_stop_without_run_dir_prints_the_command_that_resumes(tmp_path, monkeypatch):
    """The hint used to be "run the same command again", which starts a new directory."""
    import os
    import signal

    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, TINY)
    step = trainer.Trainer.train_step

    def stopped_at_step_2(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # what `distbn launch` forwards
        return step(self)

    monkeypatch.setattr(trainer.Trainer, "train_step", stopped_at_step_2)
    typed = f"distbn train {cfg} --overwrite --set logging.every_steps=3"
    code, _, err = run_quiet(cfg, ["checkpoint.every_steps=0"], command=typed)
    assert code == command.EXIT_PREEMPTED, err
    [run_dir] = (tmp_path / "runs").iterdir()
    assert f"stopped at step 3 after SIGUSR1: checkpoint {run_dir.relative_to(tmp_path)}" in err
    hint = err.split("To resume, run:\n")[1].strip()
    assert hint == (f"distbn train {cfg} --set logging.every_steps=3 --run-dir "
                    f"{run_dir.relative_to(tmp_path)}")
    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    code, out, err = run_quiet(cfg, ["checkpoint.every_steps=0"],
                               run_dir=str(run_dir.relative_to(tmp_path)))
    assert code == 0 and "resumed from step 3" in out, err


SOFTMAX_OUTPUT = TINY.replace("units: 10, kernel_regularizer: l2}",
                              "units: 10, activation: softmax}")


def test_softmax_output_fed_to_a_logits_loss_is_refused(tmp_path):
    """It used to train silently with a double softmax (the loss floored near 0.56)."""
    cfg = write(tmp_path, SOFTMAX_OUTPUT)
    code, out, err = run_quiet(cfg, run_dir=str(tmp_path / "o"))
    assert code == 2 and out == "", err
    line = _line_of(SOFTMAX_OUTPUT, "activation: softmax")
    assert f"{cfg}:{line}:" in err and "second softmax" in err
    assert not (tmp_path / "o").exists()


def test_logits_output_with_keras_default_from_logits_is_refused(tmp_path):
    cfg = write(tmp_path, TINY.replace("  from_logits: true  # the last Dense outputs logits\n",
                                       ""))
    code, _, err = run_quiet(cfg, run_dir=str(tmp_path / "o"))
    assert code == 2 and "train.from_logits is false (Keras' default" in err


def test_softmax_output_trains_with_from_logits_false(tmp_path):
    text = SOFTMAX_OUTPUT.replace("from_logits: true", "from_logits: false")
    probs = builder.build_loss(load_config(write(tmp_path, text)).train, 10, "float64")
    logits = builder.build_loss(load_config(write(tmp_path, TINY)).train, 10, "float64")
    z = np.random.default_rng(0).normal(size=(5, 10))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.arange(5)
    np.testing.assert_allclose(probs(p, y)[0], logits(z, y)[0], rtol=1e-12)
    code, out, err = run_quiet(write(tmp_path, text), run_dir=str(tmp_path / "o"))
    assert code == 0, err


TABULAR = textwrap.dedent("""\
    seed: 0
    data: {name: npz, path: DATA, num_classes: 3}
    model:
      dtype: float64
      layers: LAYERS
    train:
      from_logits: true
      global_batch_size: 8
      steps: 6
      optimizer: {name: sgd, learning_rate: 0.1}
    logging: {every_steps: 3, progress: lines}
""")


@pytest.mark.parametrize("x_shape,layers", [
    ((40, 5), "[{type: Dense, units: 8}, {type: BatchNormalization}, {type: ReLU}, "
              "{type: Dense, units: 3}]"),
    ((40, 6, 5), "[{type: BatchNormalization}, {type: Dense, units: 4}, {type: Flatten}, "
                 "{type: Dense, units: 3}]"),
])
def test_trains_on_tabular_and_sequence_npz_found_beside_the_config(tmp_path, monkeypatch,
                                                                   x_shape, layers):
    """2-D and 3-D .npz data used to be refused; data.path was taken from the working
    directory, not the config's."""
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "project"
    data_dir.mkdir()
    np.savez(data_dir / "d.npz", x_train=rng.normal(size=x_shape),
             y_train=rng.integers(0, 3, x_shape[0]).astype(np.float32),
             x_test=rng.normal(size=(10,) + x_shape[1:]), y_test=rng.integers(0, 3, 10))
    cfg = write(data_dir, TABULAR.replace("DATA", "d.npz").replace("LAYERS", layers))
    monkeypatch.chdir(tmp_path)  # not the config's directory
    code, out, err = run_quiet(cfg, run_dir=str(tmp_path / "o"))
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(data_dir / "d.npz")


def test_missing_data_file_names_the_line_and_where_it_looked(tmp_path):
    cfg = write(tmp_path, TABULAR.replace("DATA", "nope.npz").replace(
        "LAYERS", "[{type: Dense, units: 3}]"))
    code, _, err = run_quiet(cfg, run_dir=str(tmp_path / "o"))
    assert code == 2
    assert f"{cfg}:2:" in err and "data.path: data file 'nope.npz' not found" in err
    assert f"looked for {tmp_path / 'nope.npz'} (relative to {tmp_path})" in err


def test_summary_after_a_resume_counts_this_run_and_the_total(tmp_path):
    cfg = write(tmp_path, TINY)
    run_dir = str(tmp_path / "out")
    every = ["checkpoint.every_steps=3", "train.steps=6"]
    assert run_quiet(cfg, every, run_dir=run_dir)[0] == 0
    code, out, err = run_quiet(cfg, ["checkpoint.every_steps=3", "train.steps=7"],
                               run_dir=run_dir)
    assert code == 0, err
    assert "done: 1 steps (resumed at step 6; 7 steps," in out


def test_exploded_loss_is_warned_about(tmp_path, capsys):
    cfg = write(tmp_path, TINY)
    code, _, _ = run_quiet(cfg, ["train.optimizer.learning_rate=40", "train.steps=7",
                                 "train.on_nonfinite=skip_step"], run_dir=str(tmp_path / "o"))
    assert code == 0
    err = capsys.readouterr().err
    assert "warning: the training loss grew from" in err and "diverged" in err
    run_quiet(cfg, run_dir=str(tmp_path / "p"))  # a run that learns: no warning
    assert "grew" not in capsys.readouterr().err


class _PretendTwoRanks(LocalStrategy):
    num_replicas_in_sync = 2


@pytest.mark.parametrize("batch,warned", [(2, True), (4, False)])
def test_replica_local_bn_with_one_sample_per_replica_is_warned_about(tmp_path, capsys,
                                                                      batch, warned):
    config = load_config(write(tmp_path, TINY), [f"train.global_batch_size={batch}"])
    trainer.Trainer(config, _PretendTwoRanks(), out=io.StringIO())._header()
    assert ("1 sample(s) per replica" in capsys.readouterr().err) == warned


def test_first_run_says_the_kernels_compile(tmp_path, monkeypatch, capsys):
    pytest.importorskip("numba")
    import subprocess
    import sys

    from distbn import ops
    from distbn.ops import fused

    empty = tmp_path / "numba-cache"
    empty.mkdir()
    probe = "from distbn.ops import fused; print(fused.cache_is_warm())"
    cold = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**__import__("os").environ, "NUMBA_CACHE_DIR": str(empty)})
    assert cold.stdout.strip() == "False", cold.stderr
    monkeypatch.setattr(ops, "backend_name", lambda: "numba")
    monkeypatch.setattr(ops, "kernels", lambda: fused)
    monkeypatch.setattr(fused, "cache_is_warm", lambda: False)
    assert run_quiet(write(tmp_path, TINY), run_dir=str(tmp_path / "o"))[0] == 0
    assert "compiling the BN kernels (numba; first run after install only" in \
        capsys.readouterr().err


def test_cross_field_error_from_set_blames_the_set(tmp_path):
    err = io.StringIO()
    code = command.run(write(tmp_path, TINY), ["strategy.sync_group=3"],
                       strategy=_PretendTwoRanks(), err=err, out=io.StringIO(),
                       run_dir=str(tmp_path / "o"))
    assert code == 2
    assert ("--set strategy.sync_group=3: strategy.sync_group: must divide the number of "
            "ranks (2), got 3") in err.getvalue()


MASKED_SEQUENCES = textwrap.dedent("""\
    seed: 1
    data: {name: npz, path: seq.npz, num_classes: 3}
    model:
      dtype: float64
      layers:
        - {type: Dense, units: 6}
        - {type: BatchNormalization, momentum: 0.5}
        - {type: ReLU}
        - {type: GlobalAveragePooling1D}
        - {type: Dense, units: 3}
    train: {from_logits: true, global_batch_size: 8, steps: 4,
            optimizer: {name: sgd, learning_rate: 0.1}}
    logging: {every_steps: 2, progress: none}
""")


def test_masked_sequence_npz_trains_and_the_mask_reaches_the_layers(tmp_path):
    """(N, T, F) data with mask_train/mask_test: BatchNormalization's statistics and the
    pooling see only the unmasked steps, so what sits under the mask does not matter."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(24, 5, 3))
    mask = rng.random((24, 5)) < 0.6
    mask[:, 0] = True
    y = rng.integers(0, 3, 24)
    runs = {}
    for fill in (0.0, 1e3):  # the masked-out steps: zeros, or huge values
        xf = np.where(mask[..., None], x, fill)
        np.savez(tmp_path / "seq.npz", x_train=xf, y_train=y, x_test=xf[:10],
                 y_test=y[:10], mask_train=mask, mask_test=mask[:10])
        config = load_config(write(tmp_path, MASKED_SEQUENCES))
        t = trainer.Trainer(config, LocalStrategy(), out=io.StringIO())
        summary = t.fit()
        runs[fill] = (t.model.get_weight_dict(), summary["test_loss"])
    for key in runs[0.0][0]:
        np.testing.assert_allclose(runs[0.0][0][key], runs[1e3][0][key], rtol=1e-9,
                                   atol=1e-12, err_msg=key)
    assert runs[0.0][1] == pytest.approx(runs[1e3][1], rel=1e-9)


def test_a_mask_of_the_wrong_shape_is_refused(tmp_path):
    np.savez(tmp_path / "seq.npz", x_train=np.zeros((4, 5, 3)), y_train=np.zeros(4),
             x_test=np.zeros((2, 5, 3)), y_test=np.zeros(2), mask_train=np.ones((4, 4)),
             mask_test=np.ones((2, 5)))
    code, _, err = run_quiet(write(tmp_path, MASKED_SEQUENCES), run_dir=str(tmp_path / "o"))
    assert code == 2 and "mask_train: expected shape (4, 5) (N, steps), got (4, 4)" in err
