"""The trainer's collectives at several ranks (run by tests/test_mpi_suite.py at 2 and 3).

Every rank trains the N-rank run, then the same config alone (LocalStrategy) on the
whole global batches; the two must agree. Global batches of 7 and 2 give uneven shards
and, at 3 ranks, an empty one; Dropout checks that masks follow the samples, not ranks.
"""

import io
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

import distbn
from distbn.layers.base import Variable
from distbn.train import callbacks as trainer_callbacks
from distbn.train import command, trainer
from distbn.train.buckets import GradientAllReduce, broadcast_weights
from distbn.train.config import parse_config

CONFIG = textwrap.dedent("""\
    seed: 5
    data: {name: patterns, n_train: 40, n_test: 17, image_size: 8}
    model:
      dtype: float64
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same, use_bias: false}
        - {type: BatchNormalization, momentum: 0.8, gamma_regularizer: l2}
        - {type: ReLU}
        - {type: GlobalAveragePooling2D}
        - {type: Dropout, rate: 0.3}
        - {type: Dense, units: 10}
    train:
      from_logits: true  # the last Dense outputs logits
      global_batch_size: 7
      steps: 6
      optimizer: {name: sgd, learning_rate: 0.1, global_clipnorm: 0.5}
    logging: {every_steps: 2, progress: none}
""")


@pytest.fixture
def scratch():
    """A private directory per rank (pytest's tmp_path machinery races across ranks)."""
    with tempfile.TemporaryDirectory(prefix="distbn-trainer-mpi-") as d:
        yield Path(d)


@pytest.fixture
def strategy(comm):
    s = distbn.MPIStrategy(comm)
    yield s
    s.close()


@pytest.mark.mpi
def test_gradient_all_reduce_sums_every_bucket(strategy, comm):
    rank, size = comm.rank, comm.size
    shapes = [(3, 2), (5,), (300,), (1,), (4, 4)]
    dtypes = [np.float32, np.float64, np.float32, np.float64, np.float32]
    variables = []
    for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True)):
        v = Variable(np.zeros(shape), f"w{i}", dtype=dtype)
        v.grad = np.full(shape, rank + 1, dtype=dtype) * (i + 1)
        variables.append(v)
    variables[3].grad = None  # counts as zeros
    reduce = GradientAllReduce(strategy, variables, bucket_bytes=64)
    assert reduce.num_buckets >= 3
    reduce()
    total = size * (size + 1) / 2
    for i, v in enumerate(variables):
        want = 0.0 if i == 3 else total * (i + 1)
        assert v.grad.dtype == dtypes[i] and v.grad.shape == shapes[i]
        np.testing.assert_array_equal(v.grad, np.full(shapes[i], want, dtype=dtypes[i]))


@pytest.mark.mpi
def test_broadcast_weights_copies_rank_0(strategy, comm):
    variables = [Variable(np.full((2, 3), comm.rank + 0.5), "a"),
                 Variable(np.full(4, comm.rank, dtype=np.float32), "b", dtype=np.float32)]
    broadcast_weights(strategy, variables, bucket_bytes=8)
    np.testing.assert_array_equal(variables[0].value, np.full((2, 3), 0.5))
    np.testing.assert_array_equal(variables[1].value, np.zeros(4, np.float32))


def _train(config, strategy):
    t = trainer.Trainer(config, strategy, out=io.StringIO())
    summary = t.fit()
    return t, summary


@pytest.mark.mpi
@pytest.mark.parametrize("batch", [7, 2])
def test_n_ranks_reproduce_one_rank(strategy, batch):
    config = parse_config(CONFIG, overrides=[f"train.global_batch_size={batch}"])
    t, summary = _train(config, strategy)
    ref, ref_summary = _train(config, distbn.LocalStrategy())
    got, want = t.model.get_weight_dict(), ref.model.get_weight_dict()
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-10, err_msg=key)
    # Reported numbers are global: the same as one process's.
    for mine, theirs in zip(t.history, ref.history, strict=True):
        assert mine["split"] == theirs["split"] and mine["step"] == theirs["step"]
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-10)
        assert mine["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-12)
    assert summary["test_samples"] == 17
    assert summary["test_loss"] == pytest.approx(ref_summary["test_loss"], abs=1e-10)
    assert summary["train_loss"] == pytest.approx(ref_summary["train_loss"], abs=1e-10)


RESNET = textwrap.dedent("""\
    seed: 2
    data: {name: patterns, n_train: 30, n_test: 9, image_size: 8}
    model:
      dtype: float64
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same, use_bias: false}
        - {type: BatchNormalization, momentum: 0.8}
        - {type: ReLU, name: stem}
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same, use_bias: false}
        - {type: BatchNormalization, momentum: 0.8, name: residual}
        - {type: Conv2D, filters: 4, kernel_size: 1, use_bias: false, inputs: [stem]}
        - {type: BatchNormalization, momentum: 0.8, name: shortcut}
        - {type: Add, inputs: [shortcut, residual]}
        - {type: ReLU}
        - {type: GlobalAveragePooling2D}
        - {type: Dense, units: 10}
    train:
      from_logits: true
      global_batch_size: 7
      steps: 5
      optimizer: {name: sgd, learning_rate: 0.1, momentum: 0.9}
    logging: {every_steps: 5, progress: none}
""")


@pytest.mark.mpi
def test_n_ranks_reproduce_one_rank_for_a_residual_network(strategy):
    """A branching model: the shortcut's and the residual's BN both synchronized."""
    config = parse_config(RESNET)
    t, _ = _train(config, strategy)
    ref, _ = _train(config, distbn.LocalStrategy())
    got, want = t.model.get_weight_dict(), ref.model.get_weight_dict()
    assert got.keys() == want.keys() and "shortcut/moving_mean" in got
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-8, err_msg=key)


class _GatherLosses(trainer_callbacks.Callback):
    """Makes a collective in every hook: an allgather of the step's local sums."""

    def __init__(self):
        self.steps, self.evals, self.ends = [], [], []

    def on_train_begin(self, trainer):
        self.begin = trainer.strategy.allgather_object(trainer.step, name="test.begin")

    def on_step_end(self, trainer, step, logs):
        every = trainer.strategy.allgather_object(
            (step, logs["loss_sum"], logs["samples"]), name="test.step")
        self.steps.append(every)

    def on_evaluate(self, trainer, step, metrics):
        self.evals.append(trainer.strategy.allgather_object(step, name="test.eval"))

    def on_train_end(self, trainer, summary):
        self.ends.append(trainer.evaluate("train"))


@pytest.mark.mpi
def test_callbacks_may_make_collectives(strategy, comm):
    config = parse_config(CONFIG, overrides=["train.eval_every=4"])
    cb = _GatherLosses()
    t = trainer.Trainer(config, strategy, out=io.StringIO())
    t.fit(callbacks=[cb])
    ref_cb = _GatherLosses()
    ref = trainer.Trainer(config, distbn.LocalStrategy(), out=io.StringIO())
    ref.fit(callbacks=[ref_cb])
    assert cb.begin == [0] * comm.size
    # Every rank ran the hook at the same step; the local sums add up to one process's.
    assert len(cb.steps) == 6
    for mine, theirs in zip(cb.steps, ref_cb.steps, strict=True):
        assert {s for s, _, _ in mine} == {theirs[0][0]}
        assert sum(n for _, _, n in mine) == theirs[0][2]
        assert sum(loss for _, loss, _ in mine) == pytest.approx(theirs[0][1], abs=1e-10)
    assert [theirs[0][2] for theirs in ref_cb.steps] == [7] * 5 + [5]  # 40 samples
    assert cb.evals == [[4] * comm.size, [6] * comm.size]
    assert cb.ends[0]["samples"] == 40
    assert cb.ends[0]["loss"] == pytest.approx(ref_cb.ends[0]["loss"], abs=1e-10)


@pytest.mark.mpi
def test_replica_local_moving_statistics_are_averaged(strategy, comm):
    config = parse_config(CONFIG, overrides=["model.synchronized=false"])
    t, _ = _train(config, strategy)
    bn = t.model.layers[1]
    assert not bn.synchronized
    # After fit every rank holds the mean over replicas (what model.npz gets) ...
    gathered = comm.allgather(bn.moving_mean.numpy())
    for other in gathered:
        np.testing.assert_array_equal(other, gathered[0])
    # ... which differs from the one-process statistics (the shards' batches differ).
    ref, _ = _train(config, distbn.LocalStrategy())
    assert np.max(np.abs(bn.moving_mean.numpy() - ref.model.layers[1].moving_mean.numpy())) > 1e-6


@pytest.mark.mpi
def test_config_error_is_collective_and_printed_once(strategy, comm, scratch):
    path = scratch / "cfg.yaml"
    path.write_text(CONFIG.replace("units: 10", "units: 10, activaton: relu"))
    out, err = io.StringIO(), io.StringIO()
    code = command.run(path, strategy=strategy, out=out, err=err)
    assert code == 2
    text = err.getvalue()
    if comm.rank == 0:
        assert text.count("distbn train: error:") == 1
        assert "model.layers[5].activaton: unknown argument 'activaton'" in text
    else:
        assert text == ""


@pytest.mark.mpi
def test_sync_group_must_divide_the_ranks(strategy, comm, scratch):
    path = scratch / "cfg.yaml"
    path.write_text(CONFIG + f"strategy: {{sync_group: {comm.size + 1}}}\n")
    err = io.StringIO()
    assert command.run(path, strategy=strategy, out=io.StringIO(), err=err) == 2
    assert ("strategy.sync_group: must divide the number of ranks" in err.getvalue()) \
        == (comm.rank == 0)
