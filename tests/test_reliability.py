"""Reliability promises that one process can check (docs/reliability.md): the bad-config
corpus and bad data through `distbn train`, non-finite values, the failure-injection
hook, and the watchdog's and check mode's one-replica behaviour. Spawned multi-rank runs
are in test_reliability_spawn.py, collective decisions in tests/mpi/test_reliability_mpi.py.
"""

import io
import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

import distbn
from distbn import LocalStrategy, cli, faults
from distbn.distribute import watchdog
from distbn.train import builder, trainer
from distbn.train.config import ConfigError, load_config, parse_config
from distbn.train.data import BatchSchedule

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((ROOT / "configs" / "bad").glob("*.yaml"))
MARKER = "distbn-pwned-marker"  # what the corpus's !!python tags would create

TINY = textwrap.dedent("""\
    seed: 2
    data: {name: patterns, n_train: 40, n_test: 16, image_size: 8}
    model:
      dtype: float64
      layers:
        - {type: Conv2D, filters: 3, kernel_size: 3, padding: same}
        - {type: BatchNormalization, momentum: 0.5}
        - {type: ReLU}
        - {type: GlobalAveragePooling2D}
        - {type: Dense, units: 10}
    train:
      from_logits: true  # the last Dense outputs logits
      global_batch_size: 8
      steps: 6
      optimizer: {name: sgd, learning_rate: 0.1}
    logging: {every_steps: 2, progress: none}
""")


def expected_message(path) -> str:
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("# expect: "))
    return line[len("# expect: "):].replace("{config}", str(path))


def train_in_process(capsys, *args):
    """`distbn train ARGS` in this process: (exit code, stdout, stderr)."""
    code = cli.main(["train", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# --- the bad-config corpus ---------------------------------------------------------------


def test_the_corpus_covers_every_kind_of_mistake():
    names = {p.stem for p in BAD}
    for kind in ("malformed_yaml", "duplicate_key", "unknown_key_top", "unknown_key_layer",
                 "wrong_type_int", "batch_size_zero", "bn_momentum_out_of_range",
                 "negative_learning_rate", "negative_epochs", "python_tag_apply"):
        assert kind in names
    # An unknown key at every level of the schema.
    levels = [n for n in names if n.startswith("unknown_key_")]
    assert len(levels) >= 10, levels


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_exits_2_with_its_message_once_and_writes_nothing(path, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = train_in_process(capsys, path)
    assert code == 2, err
    assert err == f"distbn train: error: {expected_message(path)}\n"
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # no runs/ directory, and no tag executed


def test_python_tag_payload_would_run_under_an_unsafe_loader(tmp_path, monkeypatch):
    # The corpus's tags are live: PyYAML's unsafe loader runs them. Ours runs nothing.
    import yaml

    monkeypatch.chdir(tmp_path)
    yaml.unsafe_load((ROOT / "configs" / "bad" / "python_tag_apply.yaml").read_text())
    assert (tmp_path / MARKER).exists()


def test_run_dir_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(TINY)
    target = tmp_path / "taken"
    target.write_text("not a directory")
    code, out, err = train_in_process(capsys, cfg, "--run-dir", target)
    assert code == 2 and out == ""
    assert err == f"distbn train: error: run directory '{target}' exists and is not a directory\n"
    assert target.read_text() == "not a directory"


def test_run_dir_that_is_not_writable_is_refused_before_training(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(TINY)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores modes: make the check see one
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False
                            if os.path.abspath(p) == str(locked) else real(p, mode, **kw))
    try:
        code, out, err = train_in_process(capsys, cfg, "--run-dir", locked / "run")
    finally:
        locked.chmod(0o700)
    assert code == 2 and out == ""
    assert err == (f"distbn train: error: run directory '{locked / 'run'}' cannot be "
                   f"created: '{locked}' is not writable\n")
    assert list(locked.iterdir()) == []


# --- bad data ----------------------------------------------------------------------------


def _npz(tmp_path, **changes):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((20, 8, 8, 3), dtype=np.float32),
              "y_train": np.arange(20) % 10, "x_test": rng.random((6, 8, 8, 3),
                                                                     dtype=np.float32),
              "y_test": np.arange(6) % 10}
    arrays.update(changes)
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def _nan_x(n):
    x = np.zeros((n, 8, 8, 3), dtype=np.float32)
    x[3, 1, 2, 0] = np.nan
    return x


@pytest.mark.parametrize("changes, message", [
    ({"x_train": np.zeros((20, 8, 8, 3), dtype=np.int32)},
     "x_train: expected a float or uint8 array, got dtype int32"),
    ({"x_test": np.zeros((6, 8, 8), dtype=np.float32)},
     "x_test: sample shape (8, 8) differs from x_train's (8, 8, 3)"),
    ({"y_train": np.arange(19) % 10}, "y_train: has 19 labels but x has 20 samples"),
    ({"y_test": np.array([0, 1, 2, 3, 4, 10])},
     "y_test: labels must be < num_classes=10, got 10"),
    ({"y_train": np.full(20, 0.5)},
     "y_train: labels must be integer class ids, got 0.5 (dtype float64)"),
    ({"x_train": _nan_x(20)}, "x_train: non-finite value nan at index (3, 1, 2, 0)"),
    ({"y_test": np.array(["a", 1, 2, 3, 4, 5], dtype=object)}, "y_test: cannot load"),
], ids=["dtype", "shape", "label-count", "label-range", "label-dtype", "nan", "object-array"])
def test_bad_npz_data_is_refused_naming_the_array(tmp_path, monkeypatch, capsys, changes,
                                                  message):
    monkeypatch.chdir(tmp_path)
    data = _npz(tmp_path, **changes)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(TINY.replace("{name: patterns, n_train: 40, n_test: 16, image_size: 8}",
                                f"{{name: npz, path: {data}}}"))
    code, out, err = train_in_process(capsys, cfg)
    assert code == 2, err
    assert err.startswith(f"distbn train: error: {data}: {message}"), err
    assert err.count("distbn train: error:") == 1
    assert not (tmp_path / "runs").exists()


# --- non-finite values -------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf - inf in the statistics
def test_batch_norm_never_takes_non_finite_batch_statistics():
    bn = distbn.BatchNormalization(momentum=0.5)
    x = np.random.default_rng(1).normal(size=(6, 3))
    x[2, 0] = np.nan  # channel 0 only
    x[4, 2] = np.inf  # and channel 2
    bn(x[:, :], training=False)  # build
    y = bn(x, training=True)
    mm, mv = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    assert mm[0] == 0 and mv[0] == 1 and mm[2] == 0 and mv[2] == 1  # untouched
    assert mm[1] == pytest.approx(0.5 * x[:, 1].mean())  # channel 1 still learns
    assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1]).all()  # the caller still sees it


def _poisoned_trainer(text, on_nonfinite, poison_step):
    """A Trainer whose training sample used at `poison_step` (0-based) holds a NaN; 5 steps,
    one epoch, so no other step draws it."""
    config = parse_config(text, overrides=[f"train.on_nonfinite={on_nonfinite}",
                                           "train.steps=5"])
    data = builder.load_dataset(config)
    schedule = BatchSchedule(len(data.y_train), config.train.global_batch_size, config.seed)
    data.x_train[schedule.batch_at(poison_step)[2][0], 0, 0, 0] = np.nan
    return trainer.Trainer(config, LocalStrategy(), out=io.StringIO(), dataset=data)


def test_non_finite_raise_names_the_step_and_the_first_layer():
    t = _poisoned_trainer(TINY, "raise", poison_step=2)
    t.train_step()
    t.train_step()
    before = [w.numpy() for w in t.model.weights]
    with pytest.raises(trainer.TrainingError) as info:
        t.train_step()
    text = str(info.value)
    assert text.startswith("non-finite gradient norm (nan) and loss on rank(s) [0] at step 3 "
                           "(epoch 0); first non-finite layer output: 'conv2d' (layer 0)")
    assert "train.on_nonfinite: skip_step" in text
    # Nothing was updated from the poisoned batch: weights and moving statistics as before.
    for w, b in zip(t.model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b, err_msg=w.path)
    assert t.step == 2


def test_skip_step_skips_the_update_restores_statistics_and_advances(capsys):
    t = _poisoned_trainer(TINY, "skip_step", poison_step=2)
    t.train_step()
    t.train_step()
    before = [w.numpy() for w in t.model.weights]
    iterations = t.optimizer.iterations
    result = t.train_step()
    assert result["skipped"] and t.step == 3 and t.skipped_steps == 1
    assert t.optimizer.iterations == iterations  # no update: the schedule does not move
    for w, b in zip(t.model.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b, err_msg=w.path)
    err = capsys.readouterr().err
    assert err.count("warning: non-finite") == 1
    assert "at step 3 (epoch 0); first non-finite layer output: 'conv2d'" in err
    assert "step skipped (train.on_nonfinite: skip_step)" in err
    summary = t.fit()  # trains on to the end, finite
    assert summary["steps"] == 5 and np.isfinite(summary["train_loss"])
    assert all(np.isfinite(w.numpy()).all() for w in t.model.weights)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow being provoked
def test_diverging_run_names_the_step_through_distbn_train(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(TINY.replace("learning_rate: 0.1", "learning_rate: 1e300"))
    code, _, err = train_in_process(capsys, cfg, "--run-dir", tmp_path / "out")
    assert code == 1
    assert re.search(r"distbn train: error: non-finite gradient norm \(\w+\).* at step \d+ "
                     r"\(epoch 0\)", err), err
    assert err.count("distbn train: error:") == 1
    assert not (tmp_path / "out" / "model.npz").exists()


def test_replica_check_and_check_mode_cost_nothing_on_one_replica(tmp_path):
    config = parse_config(TINY, overrides=["train.check_replicas_every=1",
                                           "strategy.check_steps=2"])
    t = trainer.Trainer(config, LocalStrategy(), out=io.StringIO())
    t.fit()
    assert t.step == 6 and not t.strategy.check


# --- the failure-injection hook ----------------------------------------------------------


@pytest.mark.parametrize("text, point, rank, hit, action, seconds", [
    ("data", "data", None, 1, "raise", 0.0),
    ("checkpoint:0", "checkpoint", 0, 1, "raise", 0.0),
    ("data:1@3", "data", 1, 3, "raise", 0.0),
    ("bn_forward:1=sleep:60", "bn_forward", 1, 1, "sleep", 60.0),
    ("data_load@2=kill", "data_load", None, 2, "kill", 0.0),
])
def test_parse_fault(text, point, rank, hit, action, seconds):
    spec = faults.parse_fault(text)
    assert (spec.point, spec.rank, spec.hit, spec.action, spec.seconds) == (
        point, rank, hit, action, seconds)


@pytest.mark.parametrize("text, message", [
    ("dat", "unknown point 'dat'"),
    ("data:x", "must look like"),
    ("data@0", "counts from 1"),
    ("data=explode", "must look like"),
])
def test_parse_fault_errors_quote_the_value(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        faults.parse_fault(text)


def test_maybe_fail_fires_at_the_named_arrival_only(monkeypatch):
    faults._reset()
    monkeypatch.setenv(faults.FAULT_ENV_VAR, "data@2")
    faults.maybe_fail("checkpoint")  # another point: nothing
    faults.maybe_fail("data")  # first arrival: nothing
    with pytest.raises(faults.FaultInjected, match=r"injected fault at 'data' on rank 0 "
                                                   r"\(arrival 2; \$DISTBN_FAULT=data@2\)"):
        faults.maybe_fail("data")
    faults.maybe_fail("data")  # only once
    monkeypatch.setenv(faults.FAULT_ENV_VAR, "data:5")  # another rank: never
    faults._reset()
    faults.maybe_fail("data")
    monkeypatch.delenv(faults.FAULT_ENV_VAR)
    faults._reset()


def test_fault_in_data_loading_is_a_setup_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(faults.FAULT_ENV_VAR, "data_load")
    faults._reset()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(TINY)
    code, _, err = train_in_process(capsys, cfg)
    faults._reset()
    assert code == 1
    assert err.count("FaultInjected: injected fault at 'data_load' on rank 0") == 1
    assert not (tmp_path / "runs").exists()


# --- watchdog and check mode, one replica ------------------------------------------------


def test_stall_timeout_from_env():
    assert watchdog.stall_timeout_from_env({}) is None
    assert watchdog.stall_timeout_from_env({"DISTBN_STALL_TIMEOUT": " 0 "}) is None
    assert watchdog.stall_timeout_from_env({"DISTBN_STALL_TIMEOUT": "2.5"}) == 2.5
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")):
            watchdog.stall_timeout_from_env({"DISTBN_STALL_TIMEOUT": bad})


@pytest.mark.parametrize("value, error", [(0, ValueError), (-3.0, ValueError),
                                          (float("inf"), ValueError), ("10", TypeError),
                                          (True, TypeError)])
def test_check_stall_timeout_rejects(value, error):
    with pytest.raises(error, match=re.escape(f"got {value!r}")):
        watchdog.check_stall_timeout(value)


def test_describe_stall():
    states = {1: (56, 56, (56, "all_reduce", "train.metrics")), 2: (57, 56, (57, "x", None)),
              3: None}
    text = watchdog.describe_stall(0, 10.04, (57, "sync_all_reduce", "bn/forward"),
                                   [0, 1, 2, 3], states)
    assert text == ("distbn: stalled 10.0 s in collective #57 sync_all_reduce 'bn/forward'; "
                    "ranks not arrived: [1] (rank 1 is at #56 all_reduce 'train.metrics', "
                    "not in a collective); rank(s) [3] did not answer within 3 s (dead, or "
                    "stuck in code that holds the GIL); aborting the job")
    alone = watchdog.describe_stall(0, 2, (5, "barrier", None), [0, 1], {})
    assert "cannot tell which ranks" in alone


def test_one_replica_mpi_strategy_starts_no_watchdog_and_toggles_check(monkeypatch):
    from mpi4py import MPI

    monkeypatch.setenv("DISTBN_STALL_TIMEOUT", "5")
    s = distbn.MPIStrategy(comm=MPI.COMM_SELF)
    assert s.stall_timeout is None and s._watchdog is None  # nothing to wait for
    s.set_check(True)
    assert s.check
    s.set_check(False)
    assert not s.check
    with pytest.raises(TypeError, match="got 'yes'"):
        s.set_check("yes")
    monkeypatch.setenv("DISTBN_STALL_TIMEOUT", "later")
    with pytest.raises(ValueError, match="got 'later'"):
        distbn.MPIStrategy(comm=MPI.COMM_SELF)


def test_new_config_keys_and_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY)
    config = load_config(cfg)
    assert config.strategy.check_steps == 2 and config.strategy.stall_timeout is None
    assert config.train.on_nonfinite == "raise" and config.train.check_replicas_every == 0
    with pytest.raises(ConfigError, match=r"strategy.check_steps: must be >= 0, got -1"):
        load_config(cfg, ["strategy.check_steps=-1"])
