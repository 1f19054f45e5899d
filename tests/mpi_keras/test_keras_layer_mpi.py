"""distbn.keras BatchNormalization at N ranks equals plain Keras on the concatenated batch.

Every rank draws the same global batch, runs the synchronized layer on its shard (even,
uneven, empty) and plain keras.layers.BatchNormalization on the whole batch; outputs,
input gradients (the backend's autodiff), summed gamma/beta gradients and moving
statistics must agree to float32 rounding, and the moving statistics must be identical
on every rank. All collectives happen before any assertion.
"""

import keras
import numpy as np
import pytest
from comm_helpers import counting_comm_class
from keras_helpers import TrainCall, bn_weights, layer_pair
from test_sync_bn_mpi import my_slice

import distbn
import distbn.keras as dk

TOL = 2e-5


def close(a, b, what):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return
    d = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))
    assert d <= TOL, f"{what}: scaled max difference {d:.3g} > {TOL}"


@pytest.fixture
def strategy(comm):
    s = distbn.MPIStrategy(comm)
    yield s
    s.close()


def summed(strategy, arr):
    buf = np.ascontiguousarray(arr, dtype=np.float64).copy()
    return strategy.all_reduce(buf)


@pytest.mark.mpi(min_size=2)
# Each case costs two jit compilations: uneven and empty shards, with and without masks,
# channels last and first, in four.
@pytest.mark.parametrize("kind,masked,axis", [
    ("uneven", False, -1), ("empty", True, -1), ("uneven", True, 1), ("empty", False, 1),
])
def test_equals_keras_on_concatenated_batch(strategy, comm, kind, masked, axis):
    rng = np.random.default_rng(7)
    total, steps = 17, 2
    shape = (total, 4, 3) if axis == -1 else (total, 3, 4)
    channels = shape[axis]
    sl = my_slice(kind, comm, total)
    sync, plain = layer_pair(lambda make: _in_scope(strategy, make),
                             bn_weights(rng, channels), shape, axis=axis, momentum=0.6)
    run_sync, run_plain = TrainCall(sync), TrainCall(plain)
    got, want = [], []
    for step in range(steps):
        x = rng.normal(1.0 + step, 2.0, shape).astype("float32")
        dy = rng.normal(size=shape).astype("float32")
        mask = rng.random(shape[:-1]) < 0.7 if masked else None
        y, dx, (dg, db) = run_sync(x[sl], dy[sl], None if mask is None else mask[sl])
        yr, dxr, (dgr, dbr) = run_plain(x, dy, mask)
        stats = np.concatenate([keras.ops.convert_to_numpy(sync.moving_mean),
                                keras.ops.convert_to_numpy(sync.moving_variance)])
        everyone = comm.allgather(stats)
        got.append((y, dx, summed(strategy, dg), summed(strategy, db), stats, everyone))
        want.append((yr[sl], dxr[sl], dgr, dbr, np.concatenate(
            [keras.ops.convert_to_numpy(plain.moving_mean),
             keras.ops.convert_to_numpy(plain.moving_variance)])))
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for what, a, b in zip(("y", "dx", "dgamma", "dbeta", "moving"), g[:5], w, strict=True):
            close(a, b, f"step {step} {what}")
        for other in g[5]:
            np.testing.assert_array_equal(other, g[4])  # identical on every rank


def _in_scope(strategy, make):
    with strategy.scope():
        return make()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("check", [False, True])
def test_one_collective_per_pass_none_in_inference(comm, check):
    # JAX makes the statistics' collectives from compiled code (XLA FFI, distbn.
    # distribute.native) unless check mode asks for Python's descriptors: the strategy
    # counts both kinds, the communicator sees only the Python ones.
    counting = counting_comm_class()
    strategy = distbn.MPIStrategy(counting(comm), check=check)
    native = keras.backend.backend() == "jax" and not check
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6)).astype("float32")
    with strategy.scope():
        bn = dk.layers.BatchNormalization(synchronized=True)
    bn.build(x.shape)
    run = TrainCall(bn)
    run(x, x, None)  # compile outside the count
    counting.calls.clear()
    start = strategy.collective_count
    bn(x, training=True)  # forward alone
    after_forward = strategy.collective_count - start
    run(x, x, None)  # forward + backward
    after_step = strategy.collective_count - start
    last = strategy.last_collective
    bn(x, training=False)
    bn(x)
    after_inference = strategy.collective_count - start
    mpi_calls = counting.calls.get("Allreduce", 0)
    in_collective = strategy.in_collective
    strategy.close()
    assert (after_forward, after_step, after_inference) == (1, 3, 3)
    assert mpi_calls == (0 if native else 3)
    assert last[0] == start + 3 and last[1] == "sync_all_reduce" and last[2] == bn.name
    assert not in_collective


@pytest.mark.mpi(min_size=2)
def test_distributed_optimizer_one_allreduce_per_bucket(comm):
    counting = counting_comm_class()
    strategy = distbn.MPIStrategy(counting(comm))
    rank = comm.rank
    variables = [keras.Variable(np.zeros(s, "float32")) for s in ((10,), (3, 4), (7,))]
    opt = dk.DistributedOptimizer(keras.optimizers.SGD(1.0), strategy=strategy,
                                  bucket_bytes=12 * 4)  # (10,)+(3,4) exceed: 3 buckets
    grads = [keras.ops.convert_to_tensor(np.full(v.shape, rank + 1.0, "float32"))
             for v in variables]
    opt.build(variables)
    counting.calls.clear()
    opt.apply(grads, variables)
    calls = dict(counting.calls)
    strategy.close()
    mean = (comm.size + 1) / 2.0
    assert calls == {"Allreduce": 3}
    for v in variables:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(v), -mean, rtol=1e-6)
