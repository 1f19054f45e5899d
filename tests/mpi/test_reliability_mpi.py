"""Collective reliability decisions at several ranks (run by tests/test_mpi_suite.py at 2
and 3): check mode switched at step boundaries, mismatches named on every rank,
differing configs, non-finite values decided together, replica drift, and the stall
watchdog's report (with its abort replaced, so the job survives to assert)."""

import io
import tempfile
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import distbn
from distbn.train import builder, command, trainer
from distbn.train.config import parse_config
from distbn.train.data import BatchSchedule, shard_slice

CONFIG = textwrap.dedent("""\
    seed: 4
    data: {name: patterns, n_train: 35, n_test: 9, image_size: 8}
    model:
      dtype: float64
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same, use_bias: false}
        - {type: BatchNormalization, momentum: 0.8}
        - {type: ReLU}
        - {type: GlobalAveragePooling2D}
        - {type: Dense, units: 10}
    train:
      from_logits: true  # the last Dense outputs logits
      global_batch_size: 7
      steps: 5
      optimizer: {name: sgd, learning_rate: 0.1}
    logging: {every_steps: 5, progress: none}
""")


@pytest.fixture
def strategy(comm):
    s = distbn.MPIStrategy(comm)
    yield s
    s.close()


@pytest.fixture
def scratch():
    """A private directory per rank (pytest's tmp_path machinery races across ranks)."""
    with tempfile.TemporaryDirectory(prefix="distbn-reliability-mpi-") as d:
        yield Path(d)


def _trainer(strategy, overrides=(), dataset=None):
    config = parse_config(CONFIG, overrides=list(overrides))
    return trainer.Trainer(config, strategy, out=io.StringIO(), dataset=dataset)


def _same_everywhere(comm, value) -> bool:
    values = comm.allgather(value)
    return all(v == values[0] for v in values)


# --- check mode ------------------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
def test_set_check_switches_check_mode_on_and_off(strategy, comm):
    assert not strategy.check
    strategy.set_check(True)
    assert strategy.check
    with pytest.raises(distbn.CollectiveMismatchError, match="differing: shape"):
        strategy.all_reduce(np.ones(comm.rank + 1), name="mismatch")
    strategy.set_check(False)
    buf = np.ones(2)
    strategy.all_reduce(buf, name="unchecked")
    np.testing.assert_array_equal(buf, [comm.size] * 2)
    strategy.set_check(True)  # again: the communicators are reused
    with pytest.raises(distbn.CollectiveMismatchError, match="name='a'.*name='b'"):
        strategy.barrier(name="a" if comm.rank == 0 else "b")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("check_steps", [0, 2])
def test_trainer_checks_its_first_steps_then_stops(strategy, check_steps):
    t = _trainer(strategy, [f"strategy.check_steps={check_steps}"])
    t._start()
    assert strategy.check == bool(check_steps)
    t.train_step()
    assert strategy.check == bool(check_steps)
    t.train_step()
    assert not strategy.check  # switched off at the same step on every rank
    t.train_step()


@pytest.mark.mpi(min_size=2)
def test_a_rank_with_another_model_is_named_on_every_rank(strategy, comm):
    last = comm.rank == comm.size - 1
    t = _trainer(strategy, ["model.layers.0.filters=5"] if last else [])
    with pytest.raises(distbn.CollectiveMismatchError) as info:
        t.train_step()  # the first collective (the weights' broadcast) already differs
    text = str(info.value)
    assert f"replica {comm.size - 1} called" in text and "differing: shape" in text


# --- the config hash -------------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
def test_ranks_with_different_configs_exit_2_naming_them(strategy, comm, scratch):
    path = scratch / "cfg.yaml"
    path.write_text(CONFIG)
    last = comm.size - 1
    out_dir = scratch / "out"
    err = io.StringIO()
    code = command.run(path, overrides=["seed=9"] if comm.rank == last else [],
                       run_dir=str(out_dir), strategy=strategy, out=io.StringIO(), err=err)
    assert code == 2
    text = err.getvalue()
    if comm.rank == 0:
        assert text.count("distbn train: error:") == 1
        ranks = ", ".join(map(str, range(last)))
        assert "the ranks hold different resolved configs (rank(s) " + ranks in text
        assert f"; rank(s) {last}: sha256 " in text
    else:
        assert text == ""
    assert not out_dir.exists()


# --- non-finite values -----------------------------------------------------------------------


def _poisoned(comm, on_nonfinite, step=2):
    """Replica-local BN, and a NaN in a sample only the last rank trains on at `step`."""
    config = parse_config(CONFIG, overrides=["model.synchronized=false",
                                             f"train.on_nonfinite={on_nonfinite}"])
    data = builder.load_dataset(config)
    batch = BatchSchedule(len(data.y_train), 7, config.seed).batch_at(step)[2]
    mine = batch[shard_slice(len(batch), comm.size - 1, comm.size)]
    data.x_train[mine[0], 0, 0, 0] = np.nan
    return config, data


def _digest(t):
    return [w.numpy().tobytes() for w in t.model.trainable_weights]


@pytest.mark.mpi(min_size=2)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(strategy, comm):
    config, data = _poisoned(comm, "raise")
    t = trainer.Trainer(config, strategy, out=io.StringIO(), dataset=data)
    t.train_step()
    t.train_step()
    with pytest.raises(trainer.TrainingError) as info:
        t.train_step()
    last = comm.size - 1
    text = str(info.value)
    assert text.startswith(f"non-finite gradient norm (nan) and loss on rank(s) [{last}] at "
                           f"step 3 (epoch 0); first non-finite layer output: 'conv2d' "
                           f"(layer 0) on rank(s) [{last}]"), text
    assert _same_everywhere(comm, text)


@pytest.mark.mpi(min_size=2)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_skip_step_is_taken_by_every_rank_together(strategy, comm, capsys):
    config, data = _poisoned(comm, "skip_step")
    t = trainer.Trainer(config, strategy, out=io.StringIO(), dataset=data)
    t.train_step()
    t.train_step()
    before = [w.numpy() for w in t.model.weights]
    assert t.train_step()["skipped"]
    for w, b in zip(t.model.weights, before, strict=True):  # statistics put back too
        np.testing.assert_array_equal(w.numpy(), b, err_msg=w.path)
    assert (t.step, t.skipped_steps) == (3, 1)
    err = capsys.readouterr().err
    assert err.count("step skipped (train.on_nonfinite: skip_step)") == (comm.rank == 0)
    t.fit()
    assert t.step == 5 and _same_everywhere(comm, _digest(t))
    assert all(np.isfinite(w.numpy()).all() for w in t.model.weights)


# --- replica drift ---------------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
def test_replica_check_passes_for_agreeing_replicas_even_with_local_statistics(strategy):
    # Replica-local moving statistics differ by design and are left out of the check.
    t = _trainer(strategy, ["model.synchronized=false", "train.check_replicas_every=1"])
    t.fit()
    assert t.step == 5


@pytest.mark.mpi(min_size=2)
def test_replica_drift_stops_every_rank_naming_the_rank_and_tensor(strategy, comm):
    t = _trainer(strategy)
    t.train_step()
    last = comm.size - 1
    if comm.rank == last:
        kernel = t.model.get_layer("dense").kernel
        kernel.assign(kernel.numpy() + 1e-12)
    with pytest.raises(trainer.TrainingError) as info:
        t.check_replicas()
    assert str(info.value).startswith(
        f"replica check at step 1: rank(s) [{last}] hold weights that differ from rank 0's, "
        "first 'dense/kernel'")


# --- the stall watchdog ----------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
def test_no_stall_timeout_means_no_thread(strategy):
    assert strategy.stall_timeout is None and strategy._watchdog is None
    assert not [t for t in threading.enumerate() if t.name == "distbn-watchdog"]


@pytest.mark.mpi(min_size=2)
def test_the_smallest_stall_timeout_applies_on_every_rank(comm):
    s = distbn.MPIStrategy(comm, stall_timeout=None if comm.rank else 30.0 + comm.size)
    try:
        assert s.stall_timeout == 30.0 + comm.size and s._watchdog.running
    finally:
        s.close()
    assert not s._watchdog  # stopped before its communicator was freed


@pytest.mark.mpi(min_size=2)
def test_watchdog_names_the_collective_and_the_rank_that_has_not_arrived(comm):
    s = distbn.MPIStrategy(comm, stall_timeout=0.5)
    go = comm.Dup()  # rank 1 waits here, outside distbn's collectives, until rank 0 reports
    try:
        aborted = []

        def release_rank_1(code):  # the watchdog's Abort, replaced so the test can go on
            aborted.append(code)
            if comm.rank == 0:
                go.send("go", dest=1)

        s._watchdog._abort = release_rank_1
        s.all_reduce(np.ones(1), name="before")
        if comm.rank == 1:
            go.recv(source=0)
        s.all_reduce(np.ones(1), name="stalled")
        if comm.rank == 0:
            assert aborted == [1]
            assert s._watchdog.reported.startswith("distbn: stalled ")
            assert (" s in collective #2 all_reduce 'stalled'; ranks not arrived: [1] (rank 1 "
                    "is at #1 all_reduce 'before', not in a collective); aborting the job"
                    ) in s._watchdog.reported
        if comm.rank == 1:
            assert s._watchdog.reported is None  # it was not waiting in a collective
    finally:
        s.close()
        go.Free()
