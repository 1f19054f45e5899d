"""PreciseBN at several ranks (run by tests/test_mpi_suite.py at 2 and 3): N ranks, each
fed its shard of the same global batches (uneven, and empty at some ranks), equal one
process over the whole global batches in float64, bit-identical on every rank; a short
or failing rank fails every rank, with nothing changed."""

import io
import textwrap

import numpy as np
import pytest

import distbn
import distbn.random
from distbn.distribute.sharding import shard_slice
from distbn.train.precise_bn import recompute_bn_statistics

# Sizes 1 and 2 leave some ranks empty; 7 splits unevenly at 2 and 3 ranks.
SIZES = [7, 2, 5, 1, 6]


@pytest.fixture
def strategy(comm):
    s = distbn.MPIStrategy(comm)
    yield s
    s.close()


def _model(strategy):
    distbn.random.set_seed(11)
    with strategy.scope():  # one synchronized layer: PreciseBN pools all layers alike
        model = distbn.Sequential([
            distbn.Conv2D(3, 3, padding="same", dtype="float64", name="conv"),
            distbn.BatchNormalization(dtype="float64", synchronized=True, name="bn_sync"),
            distbn.ReLU(dtype="float64", name="relu"),
            distbn.GlobalAveragePooling2D(dtype="float64", name="pool"),
            distbn.Dense(4, dtype="float64", name="dense"),
            distbn.BatchNormalization(dtype="float64", renorm=True, name="bn_renorm"),
        ])
    model.build((None, 5, 5, 2))
    return model


def _global_batches():
    rng = np.random.default_rng(4)
    return [rng.normal(30.0, 2.0, size=(n, 5, 5, 2)) for n in SIZES]


def _shards(batches, rank, world):
    return [b[shard_slice(len(b), rank, world)] for b in batches]


def _gathered_equal(strategy, weights):
    """Every rank's weight dict equals rank 0's, bit for bit (gathered, then compared)."""
    everyone = strategy.allgather_object(weights, name="test.weights")
    return all(np.array_equal(w[k], everyone[0][k]) for w in everyone for k in w)


@pytest.mark.mpi
def test_n_ranks_equal_one_process_and_agree_bitwise(strategy):
    rank, world = strategy.replica_id, strategy.num_replicas_in_sync
    batches = _global_batches()
    model = _model(strategy)
    # Replica-local EMA history differs per rank: the result must not depend on it.
    rng = np.random.default_rng(100 + rank)
    for la in model.layers:
        if la.has_moving_statistics:
            la.moving_mean.assign(rng.normal(size=la.moving_mean.shape))
    summary = recompute_bn_statistics(model, _shards(batches, rank, world), len(batches),
                                      strategy)
    got = model.get_weight_dict()
    same = _gathered_equal(strategy, got)
    summaries = strategy.allgather_object(summary, name="test.summary")

    ref = _model(distbn.LocalStrategy())
    ref_summary = recompute_bn_statistics(ref, batches, len(batches), distbn.LocalStrategy())
    assert same
    # The counts are global; the changes are from each rank's own previous statistics.
    assert all({k: v["count"] for k, v in s.items()} ==
               {k: v["count"] for k, v in summaries[0].items()} for s in summaries)
    assert {k: v["count"] for k, v in summary.items()} == \
        {k: v["count"] for k, v in ref_summary.items()}
    assert summary["bn_sync"]["count"] == sum(SIZES) * 25
    for key, value in ref.get_weight_dict().items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.mpi
def test_an_empty_rank_over_every_batch_still_pools(strategy):
    rank = strategy.replica_id
    batches = _global_batches()
    mine = batches if rank == 0 else [b[:0] for b in batches]  # rank 0 holds everything
    model = _model(strategy)
    recompute_bn_statistics(model, mine, len(batches), strategy)
    ref = _model(distbn.LocalStrategy())
    recompute_bn_statistics(ref, batches, len(batches), distbn.LocalStrategy())
    for key, value in ref.get_weight_dict().items():
        np.testing.assert_allclose(model.get_weight_dict()[key], value, rtol=1e-12,
                                   atol=1e-12, err_msg=key)


@pytest.mark.mpi
def test_a_short_rank_fails_every_rank_and_changes_nothing(strategy):
    rank, world = strategy.replica_id, strategy.num_replicas_in_sync
    shards = _shards(_global_batches(), rank, world)
    if rank == world - 1:
        shards = shards[:3]
    model = _model(strategy)
    before = model.get_weight_dict()
    with pytest.raises(ValueError, match=rf"fewer than num_batches=5 items on 1 of {world} "):
        recompute_bn_statistics(model, shards, 5, strategy)
    for key, value in model.get_weight_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


@pytest.mark.mpi
def test_a_failing_forward_on_one_rank_fails_every_rank(strategy):
    rank, world = strategy.replica_id, strategy.num_replicas_in_sync
    shards = _shards(_global_batches(), rank, world)
    if rank == 0:
        shards[2] = shards[2][..., :1]  # one channel where the conv takes two
    model = _model(strategy)
    before = model.get_weight_dict()
    expected = ValueError if rank == 0 else RuntimeError
    with pytest.raises(expected):
        recompute_bn_statistics(model, shards, 5, strategy)
    for key, value in model.get_weight_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


TRAIN = textwrap.dedent("""\
    seed: 2
    data: {name: patterns, n_train: 23, n_test: 9, image_size: 6}
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
      global_batch_size: 4
      steps: 3
      eval_every: 2
      precise_bn: {batches: 7}
    logging: {every_steps: 3, progress: none}
""")


@pytest.mark.mpi
def test_trainer_option_at_n_ranks_equals_one_process(strategy):
    from distbn.train.config import parse_config
    from distbn.train.trainer import Trainer

    config = parse_config(TRAIN)
    n_rank = Trainer(config, strategy, out=io.StringIO())
    n_rank.fit()
    got = n_rank.model.get_weight_dict()
    same = _gathered_equal(strategy, got)
    one = Trainer(config, distbn.LocalStrategy(), out=io.StringIO())
    one.fit()
    assert same
    for key, value in one.model.get_weight_dict().items():
        np.testing.assert_allclose(got[key], value, rtol=1e-10, atol=1e-12, err_msg=key)
    tests = [r for r in n_rank.history if r.get("split") == "test"]
    ones = [r for r in one.history if r.get("split") == "test"]
    assert len(tests) == 2
    for a, b in zip(tests, ones, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10)
