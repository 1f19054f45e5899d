"""Synchronized BatchNormalization: N ranks equal one process on the concatenated batch.

Every rank draws the same global batch from one seed, takes its shard, and compares
its results with plain BN run locally on the whole batch. All collectives happen
before any assertion (see conftest.py), so a failure never leaves a rank waiting.
"""

import numpy as np
import pytest
from comm_helpers import counting_comm_class
from mpi4py import MPI

import distbn
from distbn import BatchNormalization

SHARDINGS = ["even", "uneven", "empty"]


def shard_sizes(kind, size, total):
    """Per-rank sample counts summing to `total`: even, 1:2:3:..., or rank 0 empty."""
    if kind == "even":
        weights = np.ones(size)
    elif kind == "uneven":
        weights = np.arange(1, size + 1, dtype=float)
    else:  # "empty": rank 0 holds nothing, the others share the batch
        weights = np.array([0.0] + [1.0] * (size - 1))
    sizes = np.floor(total * weights / weights.sum()).astype(int)
    sizes[-1] += total - sizes.sum()
    return sizes


def my_slice(kind, comm, total):
    sizes = shard_sizes(kind, comm.size, total)
    start = int(sizes[: comm.rank].sum())
    return slice(start, start + int(sizes[comm.rank]))


def make_pair(strategy, dtype="float64", seed=0, shape_c=(3,), **kwargs):
    """A synchronized layer (under `strategy`) and a plain one with the same weights."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(1.0, 0.3, shape_c), rng.normal(0.0, 0.3, shape_c),
               rng.normal(0.5, 0.1, shape_c), rng.uniform(0.5, 2.0, shape_c)]
    with strategy.scope():
        sync = BatchNormalization(synchronized=True, dtype=dtype, **kwargs)
    plain = BatchNormalization(dtype=dtype, **kwargs)
    return sync, plain, weights


def summed(strategy, arr):
    buf = np.ascontiguousarray(arr, dtype=np.float64).copy()
    strategy.all_reduce(buf)
    return buf


@pytest.fixture
def strategy(comm):
    s = distbn.MPIStrategy(comm)
    yield s
    s.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", SHARDINGS)
@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_concatenated_batch_float64(strategy, comm, kind, axis, masked):
    rng = np.random.default_rng(42)
    total, steps = 23, 3
    sl = my_slice(kind, comm, total)
    shape = (total, 4, 3) if axis == -1 else (total, 3, 4)
    sync, plain, weights = make_pair(strategy, axis=axis, momentum=0.7)
    results = []
    for step in range(steps):
        x = rng.normal(2.0 + step, 1.5, shape)
        dy = rng.normal(size=shape)
        mask = rng.random(shape[:-1]) < 0.7 if masked else None
        if step == 0:
            for layer in (sync, plain):
                layer.build(x.shape)
                layer.set_weights(weights)
        y = sync(x[sl], training=True, mask=None if mask is None else mask[sl])
        dx = sync.backward(dy[sl])
        dgamma, dbeta = summed(strategy, sync.gamma.grad), summed(strategy, sync.beta.grad)
        y_ref = plain(x, training=True, mask=mask)
        dx_ref = plain.backward(dy)
        results.append((y, y_ref[sl], dx, dx_ref[sl], dgamma, plain.gamma.grad, dbeta,
                        plain.beta.grad))
    for y, y_ref, dx, dx_ref, dg, dg_ref, db, db_ref in results:
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(dg, dg_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(db, db_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(sync.moving_mean.numpy(), plain.moving_mean.numpy(), atol=1e-10)
    np.testing.assert_allclose(sync.moving_variance.numpy(), plain.moving_variance.numpy(),
                               atol=1e-10)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["even", "uneven"])
def test_equals_concatenated_batch_float32(strategy, comm, kind):
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, (30, 5, 5, 4)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    sl = my_slice(kind, comm, len(x))
    sync, plain, weights = make_pair(strategy, dtype="float32", shape_c=(4,))
    for layer in (sync, plain):
        layer.build(x.shape)
        layer.set_weights(weights)
    y, dx = sync(x[sl], training=True), None
    dx = sync.backward(dy[sl])
    y_ref, dx_ref = plain(x, training=True), plain.backward(dy)
    assert y.dtype == np.float32 and dx.dtype == np.float32
    np.testing.assert_allclose(y, y_ref[sl], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref[sl], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sync.moving_variance.numpy(), plain.moving_variance.numpy(),
                               rtol=1e-5)


@pytest.mark.mpi(min_size=2)
def test_moving_statistics_bitwise_identical_on_every_rank(strategy, comm):
    rng = np.random.default_rng(3)
    sync, _, weights = make_pair(strategy, momentum=0.9)
    for step in range(40):
        x = rng.normal(step % 5, 1.0 + step % 3, (17, 3))
        sl = my_slice(SHARDINGS[step % 3], comm, len(x))
        sync(x[sl], training=True)
        sync.backward(np.ones_like(x[sl]))
    mine = np.concatenate([sync.moving_mean.numpy(), sync.moving_variance.numpy()])
    every = comm.allgather(mine.tobytes())
    assert all(b == every[0] for b in every), "moving statistics differ across ranks"


@pytest.mark.mpi(min_size=2)
def test_empty_global_batch_keeps_moving_statistics(strategy):
    sync, _, weights = make_pair(strategy)
    sync.build((0, 3))
    sync.set_weights(weights)
    y = sync(np.zeros((0, 3)), training=True)
    dx = sync.backward(np.zeros((0, 3)))
    assert y.shape == (0, 3) and dx.shape == (0, 3)
    np.testing.assert_array_equal(sync.moving_mean.numpy(), weights[2])
    np.testing.assert_array_equal(sync.moving_variance.numpy(), weights[3])


@pytest.mark.mpi(min_size=2)
def test_replica_local_equals_per_shard_bn(comm):
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, (20, 3))
    sl = my_slice("empty", comm, len(x))  # rank 0 gets an empty shard
    local = BatchNormalization(momentum=0.5, dtype="float64")
    alone = BatchNormalization(momentum=0.5, dtype="float64")
    y = local(x[sl], training=True)
    dx = local.backward(np.ones_like(y))
    y_ref = alone(x[sl].copy(), training=True)
    np.testing.assert_array_equal(y, y_ref)
    assert np.all(np.isfinite(dx))
    if comm.rank == 0:  # empty shard: finite and unchanged
        np.testing.assert_array_equal(local.moving_mean.numpy(), np.zeros(3))
        np.testing.assert_array_equal(local.moving_variance.numpy(), np.ones(3))
    # and replica-local is not synchronized: a rank holding part of the batch differs
    # from the global statistics
    part = BatchNormalization(momentum=0.5, dtype="float64")
    part(x[my_slice("even", comm, len(x))], training=True)
    glob = BatchNormalization(momentum=0.5, dtype="float64")
    glob(x, training=True)
    assert not np.allclose(part.moving_mean.numpy(), glob.moving_mean.numpy())


@pytest.mark.mpi(min_size=2)
def test_one_collective_per_pass_and_none_in_inference(comm):
    counting = counting_comm_class()
    strategy = distbn.MPIStrategy(counting(comm))
    with strategy.scope():
        bn = BatchNormalization(synchronized=True)
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    x[:, 0] = 3.0  # a constant channel (variance 0) needs no corrective pass
    bn.build(x.shape)
    counting.calls.clear()
    bn(x, training=True)
    after_forward = dict(counting.calls)
    bn.backward(np.ones_like(x))
    after_backward = dict(counting.calls)
    bn(x, training=False)
    bn.backward(np.ones_like(x))
    bn(x)  # training=None: inference
    after_inference = dict(counting.calls)
    strategy.close()
    assert after_forward == {"Allreduce": 1}
    assert after_backward == {"Allreduce": 2}
    assert after_inference == {"Allreduce": 2}


def test_one_replica_makes_no_mpi_call():
    counting = counting_comm_class()
    strategy = distbn.MPIStrategy(counting(MPI.COMM_SELF))
    with strategy.scope():
        bn = BatchNormalization(synchronized=True)
    x = np.random.default_rng(0).normal(size=(6, 4))
    bn(x, training=True)
    bn.backward(np.ones_like(x))
    assert sum(counting.calls.values()) == 0


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "dtype, mean, std", [("float64", 1e4, 1e-2), ("float32", 1e3, 1.0)]
)
def test_variance_is_stable_for_uncentred_data(strategy, comm, dtype, mean, std):
    """A fresh moving mean (0) is a poor shift here; the variance must stay accurate."""
    rng = np.random.default_rng(11)
    x = (mean + std * rng.standard_normal((64, 5))).astype(dtype)
    sl = my_slice("uneven", comm, len(x))
    with strategy.scope():
        bn = BatchNormalization(synchronized=True, momentum=0.0, dtype=dtype)
    bn(x[sl], training=True)
    var = bn.moving_variance.numpy().astype(np.float64)  # momentum 0: the batch variance
    ref = np.var(x.astype(np.float64), axis=0)  # two-pass reference
    assert np.all(var >= 0)
    np.testing.assert_allclose(var, ref, rtol=1e-6 if dtype == "float64" else 1e-5)


@pytest.mark.mpi(min_size=2)
def test_sync_group_of_one_is_replica_local(comm):
    rng = np.random.default_rng(8)
    x = rng.normal(3.0, 1.0, (12, 2))
    sl = my_slice("even", comm, len(x))
    strategy = distbn.MPIStrategy(comm, sync_group=1)
    with strategy.scope():
        grouped = BatchNormalization(synchronized=True, momentum=0.0, dtype="float64")
    alone = BatchNormalization(momentum=0.0, dtype="float64")
    y = grouped(x[sl], training=True)
    strategy.close()
    np.testing.assert_allclose(y, alone(x[sl].copy(), training=True), atol=1e-12)


@pytest.mark.mpi(min_size=2)
def test_check_mode_names_a_channel_mismatch_on_every_rank(comm):
    strategy = distbn.MPIStrategy(comm, check=True)
    with strategy.scope():
        bn = BatchNormalization(synchronized=True, name="bn_mismatch")
    channels = 3 + comm.rank  # every rank builds a different layer
    with pytest.raises(distbn.CollectiveMismatchError) as err:
        bn(np.ones((4, channels)), training=True)
    strategy.close()
    text = str(err.value)
    assert "bn_mismatch/forward" in text
    assert "(3, 3)" in text and "(3, 4)" in text
