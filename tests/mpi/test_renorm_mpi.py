"""Synchronized batch renormalization: N ranks equal one process on the concatenated batch.

The corrections r and d come from the global statistics, so every rank ends each step
with the same seven weights; the collectives are the plain synchronized layer's (one
Allreduce forward, one backward). All collectives happen before any assertion.
"""

import numpy as np
import pytest
from comm_helpers import counting_comm_class
from test_sync_bn_mpi import SHARDINGS, my_slice, summed

import distbn
from distbn import BatchNormalization

CLIP = {"rmax": 1.3, "rmin": 0.8, "dmax": 0.4}


@pytest.fixture
def strategy(comm):
    s = distbn.MPIStrategy(comm)
    yield s
    s.close()


def _pair(strategy, shape_c, rng, **kwargs):
    kw = dict(renorm=True, dtype="float64", momentum=0.7, renorm_momentum=0.6, **kwargs)
    with strategy.scope():
        sync = BatchNormalization(synchronized=True, **kw)
    plain = BatchNormalization(**kw)
    weights = [rng.normal(1.0, 0.3, shape_c), rng.normal(0.0, 0.3, shape_c),
               rng.normal(0.5, 0.1, shape_c), rng.uniform(0.5, 2.0, shape_c),
               rng.uniform(0.7, 1.5, shape_c), rng.normal(1.0, 0.5, shape_c),
               rng.uniform(0.7, 1.5, shape_c)]
    return sync, plain, weights


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", SHARDINGS)
@pytest.mark.parametrize("axis,masked,clip", [(-1, False, None), (1, True, CLIP),
                                              (-1, True, {"dmax": 0.1})])
def test_renorm_equals_concatenated_batch_float64(strategy, comm, kind, axis, masked, clip):
    rng = np.random.default_rng(42)
    total, steps = 23, 3
    sl = my_slice(kind, comm, total)
    shape = (total, 4, 3) if axis == -1 else (total, 3, 4)
    sync, plain, weights = _pair(strategy, (3,), rng, axis=axis, renorm_clipping=clip)
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
        grads = (summed(strategy, sync.gamma.grad), summed(strategy, sync.beta.grad))
        y_ref = plain(x, training=True, mask=mask)
        dx_ref = plain.backward(dy)
        results.append((y, y_ref[sl], dx, dx_ref[sl]) + grads
                       + (plain.gamma.grad, plain.beta.grad))
    y_inf = sync(x[sl], training=False)
    y_inf_ref = plain(x, training=False)[sl]
    every = comm.allgather(b"".join(w.tobytes() for w in sync.get_weights()))
    for y, y_ref, dx, dx_ref, dg, db, dg_ref, db_ref in results:
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(dg, dg_ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(db, db_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(y_inf, y_inf_ref, rtol=0, atol=1e-10)
    for w, w_ref in zip(sync.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-10)
    assert all(b == every[0] for b in every), "renorm weights differ across ranks"


@pytest.mark.mpi(min_size=2)
def test_renorm_one_collective_per_pass_and_none_in_inference(comm):
    counting = counting_comm_class()
    strategy = distbn.MPIStrategy(counting(comm))
    with strategy.scope():
        bn = BatchNormalization(synchronized=True, renorm=True, renorm_clipping=CLIP)
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    bn.build(x.shape)
    counting.calls.clear()
    bn(x, training=True)
    after_forward = dict(counting.calls)
    bn.backward(np.ones_like(x))
    after_backward = dict(counting.calls)
    bn(x, training=False)
    bn.backward(np.ones_like(x))
    after_inference = dict(counting.calls)
    strategy.close()
    assert after_forward == {"Allreduce": 1}
    assert after_backward == {"Allreduce": 2}
    assert after_inference == {"Allreduce": 2}


@pytest.mark.mpi(min_size=2)
def test_renorm_empty_global_batch_keeps_every_statistic(strategy):
    rng = np.random.default_rng(1)
    sync, _, weights = _pair(strategy, (3,), rng)
    sync.build((0, 3))
    sync.set_weights(weights)
    y = sync(np.zeros((0, 3)), training=True)
    dx = sync.backward(np.zeros((0, 3)))
    assert y.shape == (0, 3) and dx.shape == (0, 3)
    for w, w0 in zip(sync.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(w, w0)


def test_ghost_batches_refuse_synchronized():
    with pytest.raises(ValueError, match="virtual_batch_size.*synchronized"):
        BatchNormalization(synchronized=True, virtual_batch_size=4)
