"""Fused (numba) batch-norm kernels against the numpy reference, and the backend switch.

The fused tests skip when numba is not installed; the switch tests run either way.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import distbn
from distbn.ops import backend
from distbn.ops import batch_norm as ref

HAS_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")


@pytest.fixture
def fused():
    if not HAS_NUMBA:
        pytest.skip("numba is not installed")
    from distbn.ops import fused as module

    return module


@pytest.fixture(params=["default-blocks", "small-blocks"])
def blocks(request, fused, monkeypatch):
    """Run with the real block sizes, and with tiny ones (many blocks to merge)."""
    if request.param == "small-blocks":
        monkeypatch.setattr(fused, "_BLOCK_ELEMS", 256)
        monkeypatch.setattr(fused, "_MIN_BLOCK_ROWS", 3)
    fused._geometry_for.cache_clear()
    yield request.param
    fused._geometry_for.cache_clear()


@pytest.fixture
def restore_backend():
    """Put the backend selection back as it was after the test."""
    saved = dict(backend._state)
    yield
    backend._state.update(saved)


# (shape, reduce axes, fused?) — fused=False: the wrapper must hand over to numpy.
CASES = [
    ((64, 16, 16, 8), (0, 1, 2), True),     # channels-last, parallel (>= 2**17 elements)
    ((5, 7, 6), (0, 1), True),              # channels-last, serial
    ((6, 10, 12), (0, 1), True),            # channels-last, rows widened 4x (not 32x)
    ((20, 3, 4096), (0, 2), True),          # channels-first
    ((6, 8, 5, 5), (0, 2, 3), True),        # channels-first images
    ((10, 6, 2000), (0, 2), True),          # channels-first, parallel: 4 rows + 2 per sweep
    ((9, 4), (0,), True),                   # features
    ((4, 3, 5, 2), (0, 3), True),           # tuple axis (1, 2): adjacent channels
    ((3, 1), (1,), True),                   # axis 0 of a (N, 1) input: inner == 1
    ((4, 3, 5, 2), (0, 2), False),          # tuple axis (1, 3): not adjacent -> numpy
]
DTYPES = [np.float32, np.float64]


def _tol(dtype):
    """(rtol, atol scale) for "agree to the dtype's rounding"."""
    return (2e-6, 1e-6) if dtype == np.float32 else (1e-12, 1e-12)


def _data(shape, dtype, seed=0, loc=3.0, scale=2.0):
    rng = np.random.default_rng(seed)
    return rng.normal(loc, scale, shape).astype(dtype)


def _row_mask(shape, red, seed=1):
    """A Keras-style mask: one flag per position of the axes before the last."""
    rng = np.random.default_rng(seed)
    mask = rng.random(shape[:-1] + (1,)) < 0.6
    mask.flat[0] = True
    return mask


def _assert_moments(got, want, dtype):
    rtol, atol = _tol(dtype)
    count, mean, m2 = got
    np.testing.assert_array_equal(count, want[0])
    spread = np.sqrt(np.maximum(want[2], 0) / np.maximum(want[0], 1)) + np.abs(want[1])
    np.testing.assert_allclose(mean, want[1], rtol=rtol, atol=atol * spread.max())
    np.testing.assert_allclose(m2, want[2], rtol=10 * rtol, atol=atol * want[2].max() + 1e-300)


def _exact_moments(x, red, mask=None):
    """float64 two-pass count, mean, M2 of x (the ground truth)."""
    xd = x.astype(np.float64)
    m = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(float)
    n = m.sum(red)
    mean = (m * xd).sum(red) / np.maximum(n, 1)
    m2 = (m * (xd - np.expand_dims(mean, red)) ** 2).sum(red)
    return n, mean, m2


@pytest.mark.parametrize("shape,red,is_fused", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_moments_agree_with_numpy(fused, blocks, shape, red, is_fused, dtype, masked):
    x = _data(shape, dtype)
    mask = _row_mask(shape, red) if masked else None
    geo = fused.fused_geometry(x, red)
    assert (geo is not None) == is_fused
    # A Keras mask varies along the axes before the last: fused unless it varies inside
    # a kernel row (images channels-first: along H, after the channels).
    is_fused = is_fused and fused._flags(geo, x, mask) is not False
    got = fused.local_mean_m2(x, red, mask)
    _assert_moments(got, ref.local_mean_m2(x, red, mask), dtype)
    # Both are close to the exact float64 result; the fused one at float64 accuracy.
    _assert_moments(got, _exact_moments(x, red, mask), np.float64 if is_fused else dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moments_large_mean_small_spread(fused, blocks, dtype):
    # The shifts keep M2 exact where E[x²] - E[x]² would lose every digit.
    x = _data((4096, 8), dtype, loc=1e4, scale=1e-2 if dtype == np.float64 else 1.0)
    got = fused.local_mean_m2(x, (0,))
    want = _exact_moments(x, (0,))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-14)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-9)


def test_moments_mask_varying_inside_a_row_falls_back(fused):
    # channels-last with a mask that differs across channels: numpy does it, same answer
    x = _data((6, 5, 4), np.float32)
    mask = np.random.default_rng(3).random((6, 5, 4)) < 0.5
    mask[0, 0, :] = True
    assert fused._flags(fused.fused_geometry(x, (0, 1)), x, mask) is False
    got = fused.local_mean_m2(x, (0, 1), mask)
    for g, w in zip(got, ref.local_mean_m2(x, (0, 1), mask), strict=True):
        np.testing.assert_array_equal(g, w)


def test_moments_empty_and_fully_masked(fused, blocks):
    x = np.zeros((0, 4), np.float32)
    count, mean, m2 = fused.local_mean_m2(x, (0,))
    assert (count == 0).all() and (mean == 0).all() and (m2 == 0).all()
    x = _data((300, 4), np.float32)
    mask = np.zeros((300, 1), bool)
    mask[290:] = True  # only the last block sees data; the others are empty
    count, mean, m2 = fused.local_mean_m2(x, (0,), mask)
    _assert_moments((count, mean, m2), _exact_moments(x, (0,), mask), np.float64)
    count, mean, m2 = fused.local_mean_m2(x, (0,), np.zeros((300, 1), bool))
    assert (count == 0).all() and (mean == 0).all() and (m2 == 0).all()


def test_fallbacks_for_views_and_other_dtypes(fused):
    x = _data((8, 6), np.float64)
    assert fused.fused_geometry(x.T, (1,)) is None                 # not C-contiguous
    assert fused.fused_geometry(x.astype(np.float16), (0,)) is None
    for xx, red in [(x.T, (1,)), (x.astype(np.float16), (0,))]:
        for g, w in zip(fused.local_mean_m2(xx, red), ref.local_mean_m2(xx, red), strict=True):
            np.testing.assert_array_equal(g, w)


def _channel_args(x, red, seed=2):
    pshape = tuple(d for a, d in enumerate(x.shape) if a not in red)
    rng = np.random.default_rng(seed)
    mean = rng.normal(3.0, 0.1, pshape)
    var = rng.uniform(3.0, 5.0, pshape)
    gamma = rng.normal(1.0, 0.3, pshape)
    beta = rng.normal(0.0, 0.3, pshape)
    return mean, var, gamma, beta


def _param_shape(shape, red):
    return tuple(d for a, d in enumerate(shape) if a not in red)


@pytest.mark.parametrize("shape,red,is_fused", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["gamma+beta", "none"])
@pytest.mark.parametrize("moving_dtype", [np.float32, np.float64, np.float16])
def test_train_forward_same_bits_as_its_steps(fused, blocks, shape, red, is_fused, dtype,
                                              affine, moving_dtype):
    """The one-call forward equals moments, moving update and normalize done one by one
    (the same bits), and agrees with the numpy reference to the dtype's rounding."""
    x = _data(shape, dtype)
    rng = np.random.default_rng(4)
    pshape = _param_shape(shape, red)
    gamma, beta = ((rng.normal(1.0, 0.3, pshape), rng.normal(0.0, 0.3, pshape))
                   if affine == "gamma+beta" else (None, None))
    start = [rng.normal(3.0, 0.5, pshape).astype(moving_dtype),
             rng.uniform(1.0, 5.0, pshape).astype(moving_dtype)]
    runs = {}
    for name, fn in [("one call", fused.train_forward),
                     ("steps", lambda *a: ref.compose_train_forward(
                         fused.local_mean_m2, fused.normalize, *a)),
                     ("numpy", ref.train_forward)]:
        moving = [m.copy() for m in start]
        out = fn(x, red, None, gamma, beta, 1e-3, *moving, 0.9)
        runs[name] = (*out, *moving)
    for got, want in zip(runs["one call"], runs["steps"], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    rtol, scale = _tol(dtype)
    y, count, mean, var, moving_mean, moving_var = runs["one call"]
    assert y.dtype == dtype and count.shape == mean.shape == var.shape == pshape
    assert moving_mean.dtype == moving_dtype
    np.testing.assert_allclose(y, runs["numpy"][0], rtol=rtol, atol=scale * 10)
    np.testing.assert_allclose(var, runs["numpy"][3], rtol=rtol)
    # The moving statistics moved 10% of the way to the batch's.
    want_mean = start[0].astype(np.float64) * 0.9 + mean * 0.1
    np.testing.assert_allclose(moving_mean, want_mean.astype(moving_dtype), rtol=1e-6)


@pytest.mark.parametrize("shape,red,is_fused", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["gamma", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_train_backward_same_bits_as_its_steps(fused, blocks, shape, red, is_fused, dtype,
                                               affine, masked):
    """The one-call backward equals backward_sums then input_grad (the same bits), and
    agrees with the numpy reference to the dtype's rounding."""
    x = _data(shape, dtype)
    dy = _data(shape, dtype, seed=5, loc=0.0, scale=1.0)
    rng = np.random.default_rng(6)
    pshape = _param_shape(shape, red)
    mean = rng.normal(3.0, 0.1, pshape)
    inv_std = 1.0 / np.sqrt(rng.uniform(3.0, 5.0, pshape))
    gamma = rng.normal(1.0, 0.3, pshape) if affine == "gamma" else None
    count = np.full(pshape, x.size / max(1, int(np.prod(pshape))))
    if masked:
        mask = _row_mask(shape, red)
        count = np.broadcast_to(mask, x.shape).sum(axis=red).astype(np.float64)
    else:
        mask = None
    args = (dy, x, mean, inv_std, gamma, count, red, mask)
    got = fused.train_backward(*args)
    steps = ref.compose_train_backward(fused.backward_sums, fused.input_grad, *args)
    want = ref.train_backward(*args)
    for g, s in zip(got, steps, strict=True):
        assert g.dtype == s.dtype and g.shape == s.shape
        np.testing.assert_array_equal(g, s)
    rtol, scale = _tol(dtype)
    np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=scale * x.size)
    np.testing.assert_allclose(got[1], want[1], rtol=rtol, atol=scale * 10)


def test_train_forward_keeps_moving_stats_from_non_finite_batches(fused):
    x = _data((64, 16, 16, 8), np.float32)
    x[3, 4, 5, 2] = np.nan
    x[1, 1, 1, 6] = np.inf
    moving = [np.full(8, 0.5, np.float32), np.full(8, 2.0, np.float32)]
    y, count, mean, var = fused.train_forward(x, (0, 1, 2), None, None, None, 1e-3,
                                              *moving, 0.9)
    finite = np.ones(8, bool)
    finite[[2, 6]] = False
    assert np.isnan(y[..., 2]).all() and not np.isfinite(var[6])
    np.testing.assert_array_equal(moving[0][~finite], 0.5)
    np.testing.assert_array_equal(moving[1][~finite], 2.0)
    assert (moving[0][finite] != 0.5).all() and np.isfinite(y[..., finite]).all()


def test_train_forward_with_a_mask_takes_the_steps(fused):
    # Channels with no unmasked position keep (and are normalised with) moving stats.
    x = _data((6, 5, 4), np.float32)
    mask = np.zeros((6, 5, 1), bool)
    moving = [np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)]
    y, count, mean, var = fused.train_forward(x, (0, 1), mask, None, None, 1e-3, *moving,
                                              0.9)
    np.testing.assert_array_equal(count, 0.0)
    np.testing.assert_array_equal(mean, 0.5)
    np.testing.assert_array_equal(moving[1], 2.0)
    np.testing.assert_allclose(y, (x - 0.5) / np.sqrt(2.0 + 1e-3), rtol=1e-6)


@pytest.mark.parametrize("shape,red,is_fused", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_agrees(fused, blocks, shape, red, is_fused, dtype):
    x = _data(shape, dtype)
    mean, var, gamma, beta = _channel_args(x, red)
    for g, b in [(gamma, beta), (None, None), (gamma, None)]:
        got = fused.normalize(x, mean, var, g, b, 1e-3, red)
        want = ref.normalize(x, mean, var, g, b, 1e-3, red)
        assert got.dtype == want.dtype and got.shape == want.shape
        # Same per-channel arithmetic, same elementwise operations: the same bits.
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape,red,is_fused", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_sums_agree(fused, blocks, shape, red, is_fused, dtype):
    x = _data(shape, dtype)
    dy = _data(shape, dtype, seed=5, loc=0.0, scale=1.0)
    mean, var, _, _ = _channel_args(x, red)
    inv = ref.inverse_std(var, 1e-3)
    got = fused.backward_sums(dy, x, mean, inv, red)
    want = ref.backward_sums(dy, x, mean, inv, red)
    assert got.shape == want.shape and got.dtype == np.float64
    # Relative to the size of the terms summed: the sums themselves may cancel to ~0.
    xhat = (x.astype(np.float64) - np.expand_dims(mean, red)) * np.expand_dims(inv, red)
    scale = np.stack([np.abs(dy).sum(red), np.abs(dy * xhat).sum(red)])
    rtol, _ = _tol(dtype)
    assert np.all(np.abs(got - want) <= 4 * rtol * scale + 1e-300)


@pytest.mark.parametrize("shape,red,is_fused", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["train", "masked", "inference"])
def test_input_grad_agrees(fused, blocks, shape, red, is_fused, dtype, mode):
    x = _data(shape, dtype)
    dy = _data(shape, dtype, seed=5, loc=0.0, scale=1.0)
    mean, var, gamma, _ = _channel_args(x, red)
    inv = ref.inverse_std(var, 1e-3)
    mask = _row_mask(shape, red) if mode == "masked" else None
    if mode == "inference":
        args = (None, None, None)
    else:
        sums = ref.backward_sums(dy, x, mean, inv, red)
        count = ref.local_mean_m2(x, red, mask)[0]
        args = (sums[0], sums[1], count)
    got = fused.input_grad(dy, x, mean, inv, gamma, *args, red, mask)
    want = ref.input_grad(dy, x, mean, inv, gamma, *args, red, mask)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)  # same operations in the same order


@pytest.mark.parametrize("shape,red", [((64, 16, 16, 8), (0, 1, 2)), ((20, 3, 4096), (0, 2))])
def test_deterministic_bits(fused, blocks, shape, red):
    import numba

    x = _data(shape, np.float32)
    dy = _data(shape, np.float32, seed=9)
    mean = np.full([d for a, d in enumerate(shape) if a not in red], 3.0)

    def run():
        return (fused.local_mean_m2(x, red), fused.backward_sums(dy, x, mean, mean, red))

    first = run()
    threads = numba.get_num_threads()
    counts = sorted({1, numba.config.NUMBA_NUM_THREADS})
    try:
        for n in counts:  # the blocks do not depend on the thread count
            numba.set_num_threads(n)
            again = run()
            for a, b in zip(first[0] + (first[1],), again[0] + (again[1],), strict=True):
                assert a.tobytes() == b.tobytes()
    finally:
        numba.set_num_threads(threads)


# --- the switch -------------------------------------------------------------------------
@pytest.mark.parametrize("value,want", [(None, None), ("", None), ("numpy", "numpy"),
                                        ("numba", "numba"), (" NumBa ", "numba")])
def test_requested_backend(value, want):
    env = {} if value is None else {"DISTBN_KERNELS": value}
    assert backend.requested_backend(env) == want


def test_unknown_backend_value_is_quoted(monkeypatch, restore_backend):
    with pytest.raises(ValueError, match="DISTBN_KERNELS='fast'"):
        backend.requested_backend({"DISTBN_KERNELS": "fast"})
    monkeypatch.setenv("DISTBN_KERNELS", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        backend.set_backend(None)
    with pytest.raises(ValueError, match="'jax'"):
        backend.set_backend("jax")


def test_env_selects_numpy(monkeypatch, restore_backend):
    monkeypatch.setenv("DISTBN_KERNELS", "numpy")
    assert backend.set_backend(None) == "numpy"
    assert distbn.ops.backend_name() == "numpy"
    assert distbn.ops.kernels() is ref


@needs_numba
def test_env_selects_numba(monkeypatch, restore_backend):
    from distbn.ops import fused

    monkeypatch.setenv("DISTBN_KERNELS", "numba")
    assert backend.set_backend(None) == "numba"
    assert distbn.ops.kernels() is fused
    monkeypatch.delenv("DISTBN_KERNELS")
    assert backend.set_backend(None) == "numba"  # the default: the fastest available
    assert backend.backend_info()["selected_by"] == "default"


def test_numba_missing(monkeypatch, restore_backend):
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now fails
    monkeypatch.setenv("DISTBN_KERNELS", "numba")
    with pytest.raises(RuntimeError, match="DISTBN_KERNELS='numba'.*numba cannot be imported"):
        backend.set_backend(None)
    monkeypatch.delenv("DISTBN_KERNELS")
    assert backend.set_backend(None) == "numpy"  # the default falls back quietly
    assert "numba not importable" in backend.backend_info()["fallback"]


@pytest.mark.parametrize("env,launched,want", [
    ({}, 1, None),
    ({}, 4, 1),                                   # several ranks: one thread each
    ({"OMP_NUM_THREADS": "2"}, 4, 2),             # the user's setting wins
    ({"OMP_NUM_THREADS": "8"}, 1, 2),             # capped at numba's pool
    ({"OMP_NUM_THREADS": "junk"}, 2, 1),
    ({"NUMBA_NUM_THREADS": "2"}, 4, None),        # numba applies its own variable
])
def test_default_threads(env, launched, want):
    assert backend.default_threads(env, numba_max=2, launched=launched) == want


def test_default_threads_reads_the_launcher():
    assert backend.default_threads({"PMI_SIZE": "3"}, numba_max=2) == 1
    assert backend.default_threads({}, numba_max=2, launched=None) in (None, 1)


# --- the layer on both backends ---------------------------------------------------------
LAYER_CASES = [
    ((16, 6, 6, 8), -1, None, "float32"),
    ((8, 6, 12, 12), 1, None, "float32"),
    ((6, 10, 4), -1, (6, 10), "float64"),      # masked sequence, channels-last
    ((6, 4, 10), 1, (6, 4), "float64"),        # masked sequence, channels-first
    ((5, 3, 4, 2), (1, 2), None, "float64"),   # tuple axis
    ((6, 8), -1, None, "float16"),             # computed in float32
]


def _layer_run(axis, dtype, x, dy, mask):
    layer = distbn.BatchNormalization(axis=axis, momentum=0.5, dtype=dtype)
    out = []
    for training in (True, False):
        y = layer(x, training=training, mask=mask)
        out += [y, layer.backward(dy), layer.gamma.grad, layer.beta.grad]
    return out + layer.get_weights()


@needs_numba
@pytest.mark.parametrize("shape,axis,mask_shape,dtype", LAYER_CASES)
def test_layer_forward_backward_same_on_both_backends(shape, axis, mask_shape, dtype,
                                                      restore_backend):
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    mask = None if mask_shape is None else rng.random(mask_shape) < 0.7
    results = {}
    for name in ("numpy", "numba"):
        backend.set_backend(name)
        results[name] = _layer_run(axis, dtype, x, dy, mask)
    tol = {"float16": 2e-3, "float32": 2e-5, "float64": 1e-11}[dtype]
    for a, b in zip(results["numpy"], results["numba"], strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol * max(1.0, np.abs(a).max()))


@pytest.mark.skipif(os.environ.get("DISTBN_SLOW_TESTS") != "1",
                    reason="compiles from a cold cache (about a minute); DISTBN_SLOW_TESTS=1")
@needs_numba
def test_cold_cache_concurrent_processes(tmp_path):
    # Three processes compile the same kernels at once into an empty cache.
    script = textwrap.dedent("""
        import numpy as np, distbn
        x, dy = np.random.default_rng(0).normal(size=(2, 64, 8, 8, 16)).astype("float32")
        bn = distbn.BatchNormalization()
        y = bn(x, training=True); dx = bn.backward(dy)
        assert distbn.ops.backend_name() == "numba"
        print(repr(float(np.abs(dx).sum() + np.abs(y).sum())), flush=True)
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), DISTBN_KERNELS="numba")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    assert len({o[0] for o in outs}) == 1


@needs_numba
def test_a_kernel_cached_over_a_cached_parallel_one_loads(tmp_path):
    """numba issue #8578: one process caches rows_moments (parallel); the next compiles
    rows_packed_sums, which calls it, loading rows_moments from the cache; a third
    process that loads rows_packed_sums first crashed (segfault, numba 0.68.1) unless
    the thread pool was started before: `fused.run_kernel` starts it. (An input of
    PARALLEL_MIN_ELEMS elements: smaller ones used to start the pool by the way.)"""
    script = textwrap.dedent("""
        import sys, numpy as np
        from distbn.ops import fused
        x = np.ones((fused.PARALLEL_MIN_ELEMS // 32, 32), dtype=np.float32)
        if sys.argv[1] == "moments":
            out = fused.local_mean_m2(x, (0,))[1]
        else:
            out = fused.local_packed_sums(x, (0,), np.zeros(32))[0][0]
        print(repr(float(out.sum())), flush=True)
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), DISTBN_KERNELS="numba")
    outs = []
    for step in ("moments", "sums", "sums"):
        proc = subprocess.run([sys.executable, "-c", script, step], env=env, text=True,
                              capture_output=True, timeout=600)
        assert proc.returncode == 0, (step, proc.returncode, proc.stderr[-2000:])
        outs.append(float(proc.stdout))
    rows = 131072 // 32
    assert outs == [32.0, 32.0 * rows, 32.0 * rows]


def test_widened_rows_compute_what_the_plain_rows_do(fused):
    """Elementwise kernels on rows of few channels run on (R/reps, reps*C) views with the
    channel vectors tiled: the same bits as the (R, C) kernels, masked rows unwidened."""
    from distbn.ops import _fused_kernels as _k

    assert fused._widening(16384, 16) == 16 and fused._widening(60, 12) == 4
    assert fused._widening(35, 6) == 1 and fused._widening(64, 256) == 1
    x = _data((6, 10, 12), np.float32)
    dy = _data((6, 10, 12), np.float32, seed=5, loc=0.0, scale=1.0)
    red = (0, 1)
    geo = fused.fused_geometry(x, red)
    assert geo.reps == 4 and geo.wide2 == (15, 48)
    rng = np.random.default_rng(8)
    mean, var, gamma, beta = rng.normal(3, 1, 12), rng.uniform(1, 4, 12), rng.normal(
        1, 0.3, 12), rng.normal(0, 0.3, 12)
    plain = np.empty_like(x)
    _k.rows_normalize(x.reshape(60, 12), mean, var, gamma, beta, 1e-3, True, True,
                      plain.reshape(60, 12), 64)
    np.testing.assert_array_equal(fused.normalize(x, mean, var, gamma, beta, 1e-3, red),
                                  plain)
    inv = 1.0 / np.sqrt(var + 1e-3)
    count = np.full(12, 60.0)
    sums = ref.backward_sums(dy, x, mean, inv, red)
    vecs = []
    a = inv * gamma
    coef = a / count
    for v in (a, mean, coef * sums[1] * inv, coef * sums[0]):
        vecs.append(v.astype(np.float32))
    plain = np.empty_like(x)
    _k.rows_input_grad(dy.reshape(60, 12), x.reshape(60, 12), *vecs, None,
                       plain.reshape(60, 12), 64)
    got = fused.input_grad(dy, x, mean, inv, gamma, sums[0], sums[1], count, red)
    np.testing.assert_array_equal(got, plain)
    mask = np.ones((6, 10, 1), bool)
    mask[2] = False
    masked = fused.input_grad(dy, x, mean, inv, gamma, sums[0], sums[1], count, red, mask)
    np.testing.assert_array_equal(masked[mask[..., 0]], plain[mask[..., 0]])
