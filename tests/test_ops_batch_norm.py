"""Pure batch-norm kernels: sums, stability, packing, sharded equivalence, gradients."""

import warnings

import numpy as np
import pytest

from distbn.ops import batch_norm as K


def _ref_moments(x, reduce_axes, mask=None):
    """Reference masked mean and biased variance, straightforward float64 two-pass."""
    x = x.astype(np.float64)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(float)
    n = m.sum(reduce_axes)
    mean = (m * x).sum(reduce_axes) / n
    var = (m * (x - np.expand_dims(mean, reduce_axes)) ** 2).sum(reduce_axes) / n
    return n, mean, var


CASES = [((6, 4), (0,)), ((3, 5, 4), (0, 1)), ((4, 3, 5), (0, 2)), ((2, 3, 4, 5), (0, 1, 2)),
         ((5, 3, 2), (0,)), ((4, 6), (1,))]


@pytest.mark.parametrize("shape,red", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_local_moments_match_reference(shape, red, masked):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, shape)
    mask = None
    if masked:
        mask = rng.random(shape[:-1] + (1,)) < 0.7
        mask.flat[0] = True
    shift = rng.normal(size=tuple(d for a, d in enumerate(shape) if a not in red))
    if masked and red == (1,):
        mask[1] = False  # a channel with no unmasked position
    count, s1, s2 = K.local_moments(x, red, shift, mask)
    with np.errstate(invalid="ignore"):
        n, mean, var = _ref_moments(x, red, mask)
    np.testing.assert_allclose(count, n)
    empty = n == 0
    assert (s1[empty] == 0).all() and (s2[empty] == 0).all()
    mean, var = np.where(empty, shift, mean), np.where(empty, 0.0, var)
    np.testing.assert_allclose(s1, n * (mean - shift), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s2, n * var + n * (mean - shift) ** 2, rtol=1e-12)
    mean2, var2 = K.moments_from_sums(count, s1, s2, shift)
    np.testing.assert_allclose(mean2, mean, rtol=1e-12)
    np.testing.assert_allclose(var2, var, rtol=1e-10)


def test_mask_broadcast_counts_every_position():
    # mask of size 1 on a reduced axis counts that axis' length (Keras broadcasts it)
    x = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    mask = np.array([[True], [False]])[:, :, None]  # shape (2, 1, 1)
    count, mean, _ = K.local_mean_m2(x, (0, 2), mask)
    np.testing.assert_array_equal(count, [4, 4, 4])
    np.testing.assert_allclose(mean, x[0].mean(1))


def test_stability_float64_large_mean_small_std():
    rng = np.random.default_rng(2)
    x = 1e4 + 1e-2 * rng.standard_normal((4096, 3))
    ref = np.var(x, axis=0)  # numpy's two-pass
    count, mean, m2 = K.local_mean_m2(x, (0,))
    np.testing.assert_allclose(m2 / count, ref, rtol=1e-6)
    # a shift near the mean (a warmed-up moving mean) keeps S2/N - (S1/N)^2 accurate
    shift = np.full(3, 1e4 + 3e-3)
    _, var = K.moments_from_sums(*K.local_moments(x, (0,), shift), shift)
    np.testing.assert_allclose(var, ref, rtol=1e-6)
    assert (var >= 0).all()


def test_stability_float32_mean_1e3():
    rng = np.random.default_rng(3)
    x = (1e3 + rng.standard_normal((2048, 4))).astype(np.float32)
    ref = np.var(x.astype(np.float64), axis=0)
    count, mean, m2 = K.local_mean_m2(x, (0,))
    np.testing.assert_allclose(m2 / count, ref, rtol=1e-5)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-12)


def test_variance_never_negative():
    x = np.full((1000, 2), 1e4 + 1e-3)
    count, mean, m2 = K.local_mean_m2(x, (0,))
    assert (m2 >= 0).all() and np.allclose(m2, 0)
    # a far shift makes S2/N - (S1/N)^2 cancel to rounding noise: clipped at 0
    shift = np.zeros(2)
    _, var = K.moments_from_sums(*K.local_moments(x, (0,), shift), shift)
    assert (var >= 0).all()


def test_empty_and_zero_count_are_quiet():
    x = np.zeros((0, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count, s1, s2 = K.local_moments(x, (0,), np.ones(3))
        mean, var = K.moments_from_sums(count, s1, s2, np.ones(3))
        sums = K.backward_sums(np.zeros((0, 3)), x, mean, np.ones(3), (0,))
        dx = K.input_grad(x, x, mean, np.ones(3), None, sums[0], sums[1], count, (0,))
    np.testing.assert_array_equal(count, 0)
    np.testing.assert_array_equal(mean, 1.0)  # the shift: callers fall back to moving stats
    np.testing.assert_array_equal(var, 0.0)
    assert dx.shape == (0, 3)


def test_pack_unpack_round_trip():
    c, s1, s2 = np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([5.0, 6.0])
    buf = K.pack_moments(c, s1, s2)
    assert buf.dtype == np.float64 and buf.flags.c_contiguous and buf.shape == (3, 2)
    np.testing.assert_array_equal(buf[0], s1)  # layout [S1, S2, n]
    for a, b in zip(K.unpack_moments(buf), (c, s1, s2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_normalize_formula_and_dtype():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 2, 3)).astype(np.float32)
    mean, var = rng.normal(size=(2,)), rng.random(2) + 0.5
    gamma, beta = rng.normal(size=2), rng.normal(size=2)
    y = K.normalize(x, mean, var, gamma, beta, 1e-3, (0, 2))
    e = lambda v: v[None, :, None]  # noqa: E731
    ref = e(gamma) * (x - e(mean)) / np.sqrt(e(var) + 1e-3) + e(beta)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(K.normalize(x, mean, var, None, None, 1e-3, (0, 2)),
                               (x - e(mean)) / np.sqrt(e(var) + 1e-3), rtol=1e-5, atol=1e-5)


def _train_forward(x, gamma, beta, red, mask, eps=1e-3):
    count, s1, s2 = K.local_moments(x, red, np.zeros(gamma.shape), mask)
    mean, var = K.moments_from_sums(count, s1, s2, np.zeros(gamma.shape))
    return K.normalize(x, mean, var, gamma, beta, eps, red), mean, var, count


@pytest.mark.parametrize("shape,red", CASES[:4])
@pytest.mark.parametrize("masked", [False, True])
def test_input_grad_central_differences(shape, red, masked):
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, shape)
    pshape = tuple(d for a, d in enumerate(shape) if a not in red)
    gamma, beta = rng.normal(size=pshape), rng.normal(size=pshape)
    w = rng.normal(size=shape)
    mask = (rng.random(shape[:-1] + (1,)) < 0.6) if masked else None
    if masked:
        mask.flat[:2] = True
    y, mean, var, count = _train_forward(x, gamma, beta, red, mask)
    inv = K.inverse_std(var, 1e-3)
    sums = K.backward_sums(w, x, mean, inv, red)
    dx = K.input_grad(w, x, mean, inv, gamma, sums[0], sums[1], count, red, mask)
    h = 1e-6
    num = np.empty_like(x)
    for i in range(x.size):
        xp, xm = x.copy(), x.copy()
        xp.flat[i] += h
        xm.flat[i] -= h
        num.flat[i] = ((_train_forward(xp, gamma, beta, red, mask)[0] * w).sum()
                       - (_train_forward(xm, gamma, beta, red, mask)[0] * w).sum()) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
    # beta's and gamma's gradients are the sums over all positions
    xhat = (x - np.expand_dims(mean, red)) * np.expand_dims(inv, red)
    np.testing.assert_allclose(sums[0], w.sum(red), rtol=1e-12)
    np.testing.assert_allclose(sums[1], (w * xhat).sum(red), rtol=1e-10, atol=1e-12)


def test_inference_input_grad_is_affine():
    rng = np.random.default_rng(6)
    x, dy = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    gamma, inv = rng.normal(size=3), rng.random(3) + 0.1
    dx = K.input_grad(dy, x, np.zeros(3), inv, gamma, None, None, None, (0,))
    np.testing.assert_allclose(dx, dy * gamma * inv)


@pytest.mark.parametrize("masked", [False, True])
def test_sharded_sums_equal_whole_batch(masked):
    """What the synchronized layer does: one summed buffer forward, one backward."""
    rng = np.random.default_rng(7)
    x = rng.normal(5.0, 2.0, (11, 4, 3))
    dy = rng.normal(size=x.shape)
    mask = (rng.random((11, 4, 1)) < 0.7) if masked else None
    red, gamma, eps = (0, 1), rng.normal(size=3), 1e-3
    shift = rng.normal(5.0, 0.1, 3)  # identical on every "rank"
    bounds = [0, 4, 4, 9, 11]  # uneven shards, one empty
    shards = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    sub = lambda m, s: None if m is None else m[s]  # noqa: E731

    buf = sum(K.pack_moments(*K.local_moments(x[s], red, shift, sub(mask, s)))
              for s in shards)
    mean, var = K.moments_from_sums(*K.unpack_moments(buf), shift)
    whole_mean, whole_var = K.moments_from_sums(*K.local_moments(x, red, shift, mask), shift)
    np.testing.assert_allclose(mean, whole_mean, rtol=1e-13)
    np.testing.assert_allclose(var, whole_var, rtol=1e-12)

    inv = K.inverse_std(var, eps)
    count = K.unpack_moments(buf)[0]
    gsum = sum(K.backward_sums(dy[s], x[s], mean, inv, red) for s in shards)
    dx = np.concatenate([K.input_grad(dy[s], x[s], mean, inv, gamma, gsum[0], gsum[1], count,
                                      red, sub(mask, s)) for s in shards])
    whole = K.backward_sums(dy, x, mean, inv, red)
    np.testing.assert_allclose(gsum, whole, rtol=1e-12)
    ref = K.input_grad(dy, x, mean, inv, gamma, whole[0], whole[1], count, red, mask)
    np.testing.assert_allclose(dx, ref, rtol=1e-10, atol=1e-12)
