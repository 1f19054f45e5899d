"""The synchronized step's halves and `distbn.ops.step.TrainStep`: the same bits as the
functions they stand for, in both geometries and dtypes.

`fused.local_packed_sums` / `normalize_from_sums` / `input_grad_from_sums` /
`update_running` against the numpy reference's, and each `TrainStep` method against the
`fused` functions (and PyTorch's running-statistics rule written out).
"""

import numpy as np
import pytest

from distbn.ops import batch_norm as ref

pytest.importorskip("numba")
from distbn.ops import fused  # noqa: E402
from distbn.ops.step import train_step  # noqa: E402

# (shape, reduce axes): rows (channels last, widened and not) and planes (channels first).
GEOMETRIES = [((6, 5, 4, 16), (0, 1, 2)), ((37, 3), (0,)), ((4, 5, 3, 7), (0, 2, 3))]
IDS = ["rows-wide", "rows", "planes"]


def _data(shape, axes, dtype, far=False, seed=0):
    rng = np.random.default_rng(seed)
    nch = shape[[a for a in range(len(shape)) if a not in axes][0]]
    x = (rng.normal(size=shape) * 1.5 + 0.7).astype(dtype)
    if far:  # the shift far from the mean: the ill-conditioned case
        x = (x * 1e-4 + 1e3).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    vec = {k: rng.normal(size=nch) for k in ("gamma", "beta", "shift")}
    return x, dy, vec


def _same(got, want):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axes"), GEOMETRIES, ids=IDS)
def test_halves_give_the_reference_bits(shape, axes, dtype):
    x, dy, v = _data(shape, axes, dtype)
    packed = fused.local_packed_sums(x, axes, v["shift"])
    want = ref.local_packed_sums(x, axes, v["shift"])
    # The fused moments are one pass with float64 sums, the reference's centre in x's
    # dtype: equal to rounding; the packed buffer is the reference's arithmetic on them
    # (checked just below).
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    for g, w in zip(packed, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-9)
    count, mean, m2 = packed[1:]
    np.testing.assert_array_equal(packed[0], ref.pack_moments(
        count, *ref.shifted_sums(count, mean, m2, v["shift"])))
    summed = packed[0] * 2.0  # two identical replicas
    for gamma, beta in ((v["gamma"], v["beta"]), (None, None)):
        _same(fused.normalize_from_sums(x, axes, summed, v["shift"], gamma, beta, 1e-3),
              ref.normalize_from_sums(x, axes, summed, v["shift"], gamma, beta, 1e-3))
    _, mu, var, total = ref.normalize_from_sums(x, axes, summed, v["shift"], None, None, 1e-3)
    inv = ref.inverse_std(var, 1e-3)
    sums = ref.backward_sums(dy, x, mu, inv, axes) * 2.0
    for gamma in (v["gamma"], None):
        np.testing.assert_array_equal(
            fused.input_grad_from_sums(dy, x, mu, inv, gamma, sums, total, axes),
            ref.input_grad_from_sums(dy, x, mu, inv, gamma, sums, total, axes))
    # Reductions: summed in another order than numpy's, so equal to rounding only.
    np.testing.assert_allclose(fused.backward_sums(dy, x, mu, inv, axes),
                               ref.backward_sums(dy, x, mu, inv, axes), rtol=1e-5,
                               atol=1e-9)


def test_normalize_from_sums_reports_an_ill_conditioned_buffer():
    x, _, v = _data((9, 4), (0,), np.float64, far=True)
    for mod in (fused, ref):
        packed = mod.local_packed_sums(x, (0,), v["shift"])[0]
        y, mean, var, total = mod.normalize_from_sums(x, (0,), packed, v["shift"], None, None,
                                                      1e-3)
        assert y is None and total.tolist() == [9.0] * 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_running_is_pytorchs_rule(dtype):
    rng = np.random.default_rng(1)
    mean, var = rng.normal(size=5), rng.uniform(0.5, 2.0, 5)
    start = [rng.normal(size=5).astype(dtype), rng.uniform(0.5, 2, 5).astype(dtype)]
    want = [((1 - 0.1) * s.astype(np.float64) + 0.1 * stat).astype(dtype)
            for s, stat in zip(start, (mean, var * (8 / 7)), strict=True)]
    for mod in (fused, ref):
        rm, rv = start[0].copy(), start[1].copy()
        mod.update_running(rm, rv, np.full(5, 8.0), mean, var, 0.1)
        np.testing.assert_array_equal(rm, want[0])
        np.testing.assert_array_equal(rv, want[1])
        mod.update_running(rm, rv, np.zeros(5), mean, var, 0.1)  # an empty batch: untouched
        np.testing.assert_array_equal(rm, want[0])
        mod.update_running(None, rv, np.full(5, 8.0), mean, var, 0.1)  # one array only
        assert not np.array_equal(rv, want[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "axes"), GEOMETRIES, ids=IDS)
def test_train_step_gives_the_fused_functions_bits(shape, axes, dtype):
    x, dy, v = _data(shape, axes, dtype)
    step = train_step(x, axes)
    gamma, beta = v["gamma"].astype(dtype), v["beta"].astype(dtype)  # as a module holds them
    g64, b64 = gamma.astype(np.float64), beta.astype(np.float64)
    nch = gamma.size
    rm, rv = np.zeros(nch, dtype), np.ones(nch, dtype)
    # One replica: fused.train_forward (its moving update on scratch), then the rule.
    y, count, mean, var, inv = step.forward(x, gamma, beta, 1e-3, rm, rv, 0.1)
    want = fused.train_forward(x, axes, None, g64, b64, 1e-3, np.zeros(nch), np.ones(nch), 1.0)
    _same((y, count, mean, var), want)
    np.testing.assert_array_equal(inv, ref.inverse_std(var, 1e-3))
    wm, wv = np.zeros(nch, dtype), np.ones(nch, dtype)
    ref.update_running(wm, wv, count, mean, var, 0.1)
    _same((rm, rv), (wm, wv))
    _same(step.backward(dy, x, mean, inv, gamma, count),
          fused.train_backward(dy, x, mean, inv, g64, count, axes))
    _same(step.backward(dy, x, mean, inv, None, count),
          fused.train_backward(dy, x, mean, inv, None, count, axes))
    # Synchronized halves (two identical replicas), without running statistics too.
    packed = step.local_sums(x, v["shift"])
    _same(packed, fused.local_packed_sums(x, axes, v["shift"]))
    summed = packed[0] * 2.0
    for running in ((rm.copy(), rv.copy()), (None, None)):
        got = step.finish_forward(x, summed, v["shift"], gamma, beta, 1e-3, *running, 0.1)
        y, mean, var, total = fused.normalize_from_sums(x, axes, summed, v["shift"], g64,
                                                        b64, 1e-3)
        _same(got, (y, mean, var, total, ref.inverse_std(var, 1e-3)))
    sums = step.grad_sums(dy, x, mean, got[4])
    _same((sums,), (fused.backward_sums(dy, x, mean, got[4], axes),))
    _same((step.input_grad(dy, x, sums * 2, mean, got[4], gamma, total),),
          (fused.input_grad_from_sums(dy, x, mean, got[4], g64, sums * 2, total, axes),))


def test_train_step_finish_leaves_everything_when_ill_conditioned():
    x, _, v = _data((9, 4), (0,), np.float64, far=True)
    step = train_step(x, (0,))
    rm, rv = np.zeros(4), np.ones(4)
    packed = step.local_sums(x, v["shift"])[0]
    y, *_ = step.finish_forward(x, packed, v["shift"], None, None, 1e-3, rm, rv, 0.1)
    assert y is None and rm.tolist() == [0.0] * 4 and rv.tolist() == [1.0] * 4


def test_no_train_step_for_inputs_the_fused_kernels_do_not_take():
    assert train_step(np.zeros((0, 3)), (0,)) is None
    assert train_step(np.zeros((4, 3), np.float16), (0,)) is None
    assert train_step(np.zeros((4, 6)).T, (0,)) is None
