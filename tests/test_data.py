"""Data: the embedded patterns set, .npz validation, shuffling and sharding."""

import textwrap
import time

import numpy as np
import pytest

from distbn.train.data import (
    PATTERN_CLASSES,
    BatchSchedule,
    DataError,
    batch_at,
    epoch_permutation,
    global_batches,
    load_npz,
    make_patterns,
    shard_slice,
    steps_per_epoch,
    to_data_format,
)

# --- patterns ------------------------------------------------------------------------------


def test_patterns_shapes_and_dtypes():
    x_train, y_train, x_test, y_test = make_patterns(50, 20, image_size=12, num_classes=10)
    assert x_train.shape == (50, 12, 12, 3) and x_test.shape == (20, 12, 12, 3)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.shape == (50,) and y_test.shape == (20,)
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert np.isfinite(x_train).all() and np.isfinite(x_test).all()
    x64 = make_patterns(50, 20, image_size=12, dtype="float64")[0]
    assert x64.dtype == np.float64
    np.testing.assert_array_equal(x64, x_train.astype(np.float64))  # same data, wider type
    assert len(PATTERN_CLASSES) == 10


def test_patterns_deterministic_and_seed_sensitive():
    a = make_patterns(200, 50, seed=3)
    b = make_patterns(200, 50, seed=3)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    c = make_patterns(200, 50, seed=4)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[2], c[2])
    # The training set does not depend on the size of the test set.
    d = make_patterns(200, 10, seed=3)
    np.testing.assert_array_equal(a[0], d[0])
    np.testing.assert_array_equal(a[1], d[1])


@pytest.mark.parametrize("n,num_classes", [(1000, 10), (1003, 10), (7, 3), (5, 10)])
def test_patterns_class_balance(n, num_classes):
    y = make_patterns(n, 0, num_classes=num_classes)[1]
    counts = np.bincount(y, minlength=num_classes)
    assert counts.size == num_classes and counts.sum() == n
    assert counts.max() - counts.min() <= 1
    assert y.min() >= 0 and y.max() < num_classes


def test_patterns_are_not_normalised_and_vary_per_sample():
    x, y = make_patterns(2000, 0)[:2]
    per_sample_mean = x.mean(axis=(1, 2, 3))
    per_sample_std = x.std(axis=(1, 2, 3))
    # Brightness and contrast jitter: what per-batch normalisation has to undo.
    assert per_sample_mean.std() > 0.1
    assert per_sample_std.max() / per_sample_std.min() > 3
    assert 0.3 < x.mean() < 0.7
    # Classes are not told apart by mean colour alone: class means are close together.
    class_means = np.stack([x[y == c].mean(axis=(0, 1, 2)) for c in range(10)])
    assert np.abs(class_means - class_means.mean(0)).max() < 0.15


def test_patterns_fast():
    start = time.perf_counter()
    make_patterns(20000, 0)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("kwargs,match", [
    ({"n_train": -1}, "n_train must be an int >= 0, got -1"),
    ({"n_test": 2.5}, "n_test must be an int >= 0, got 2.5"),
    ({"image_size": 3}, "image_size must be an int >= 4, got 3"),
    ({"num_classes": 11}, r"num_classes must be an int in 1\.\.10, got 11"),
    ({"num_classes": True}, "num_classes must be an int in 1..10, got True"),
    ({"seed": -2}, "seed must be an int >= 0, got -2"),
    ({"dtype": "float16"}, "dtype must be 'float32' or 'float64', got 'float16'"),
])
def test_patterns_argument_errors(kwargs, match):
    args = {"n_train": 4, "n_test": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_patterns(**args)


# --- npz ---------------------------------------------------------------------------------


def _arrays(n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.random((n_train, 5, 5, 2), dtype=np.float32),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.random((n_test, 5, 5, 2), dtype=np.float32),
        "y_test": np.arange(n_test) % 3,
    }


def _save(tmp_path, **changes):
    arrays = _arrays()
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_load_npz_valid(tmp_path):
    path = _save(tmp_path, extra=np.array(["a", "b"]))  # extra arrays are ignored
    x_train, y_train, x_test, y_test = load_npz(path, num_classes=3)
    np.testing.assert_array_equal(x_train, _arrays()["x_train"])
    assert y_train.dtype == np.int64 and x_test.shape == (4, 5, 5, 2)
    np.testing.assert_array_equal(y_test, [0, 1, 2, 0])


def test_load_npz_uint8_scaled(tmp_path):
    x = np.full((6, 5, 5, 2), 255, np.uint8)
    path = _save(tmp_path, x_train=x, x_test=x[:4])
    x_train = load_npz(path)[0]
    assert x_train.dtype == np.float32 and np.all(x_train == 1.0)


@pytest.mark.parametrize("changes,message", [
    ({"y_test": None}, "missing array(s) y_test"),
    ({"x_train": None, "y_train": None}, "missing array(s) x_train, y_train"),
    ({"x_train": np.zeros((6, 5, 5, 2), np.int32)},
     "x_train: expected a float or uint8 array, got dtype int32"),
    ({"x_test": np.zeros((4, 5, 5, 1, 1), np.float32)},
     "x_test: expected (N, features), (N, steps, features) or NHWC images (N, height, "
     "width, channels), got shape (4, 5, 5, 1, 1)"),
    ({"x_test": np.zeros((4, 5, 5), np.float32)},
     "x_test: sample shape (5, 5) differs from x_train's (5, 5, 2)"),
    ({"x_test": np.zeros((4, 5, 5, 3), np.float32)},
     "x_test: sample shape (5, 5, 3) differs from x_train's (5, 5, 2)"),
    ({"x_train": np.full((6, 5, 5, 2), np.nan, np.float32)},
     "x_train: non-finite value"),
    ({"x_test": np.pad(np.zeros((4, 5, 5, 1), np.float32), ((0, 0),) * 3 + ((0, 1),),
                       constant_values=np.inf)},
     "x_test: non-finite value inf at index (0, 0, 0, 1)"),
    ({"y_train": np.zeros(5, np.int64)}, "y_train: has 5 labels but x has 6 samples"),
    ({"y_train": np.zeros((6, 1), np.int64)},
     "y_train: expected a 1-D label array, got shape (6, 1)"),
    ({"y_test": np.array([0, 1.5, 1, 0], np.float32)},
     "y_test: labels must be integer class ids, got 1.5 (dtype float32)"),
    ({"y_test": np.array(["a", "b", "c", "d"])},
     "y_test: expected integer class labels, got dtype <U1"),
    ({"y_test": np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]},
     "y_test: labels look one-hot (shape (4, 3)); store class ids instead, e.g. "
     "np.argmax(y, axis=1)"),
    ({"y_test": np.array([0, 1, 2, 3])}, "y_test: labels must be < num_classes=3, got 3"),
    ({"y_train": np.array([0, 1, -1, 0, 0, 0])}, "y_train: labels must be >= 0, got -1"),
    ({"x_train": np.zeros((0, 5, 5, 2), np.float32), "y_train": np.zeros(0, np.int64)},
     "x_train: has no samples"),
])
def test_load_npz_errors_name_the_array(tmp_path, changes, message):
    path = _save(tmp_path, **changes)
    with pytest.raises(DataError) as info:
        load_npz(path, num_classes=3)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert message in str(info.value)


def test_load_npz_refuses_object_arrays(tmp_path):
    path = tmp_path / "data.npz"
    arrays = _arrays()
    arrays["y_train"] = np.array([0, 1, None, 0, 1, 2], dtype=object)
    np.savez(path, **arrays)  # stored with pickle; loading must not unpickle it
    with pytest.raises(DataError, match="y_train: cannot load"):
        load_npz(path)


def test_load_npz_missing_and_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")  # numpy would answer with a message about allow_pickle
    with pytest.raises(DataError, match=r"not an .npz archive .*first bytes are b'not a '"):
        load_npz(bad)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="cannot read as .npz"):
        load_npz(broken)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match="single .npy array"):
        load_npz(single)


# --- layout --------------------------------------------------------------------------------


def test_to_data_format():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    assert to_data_format(x, "channels_last") is x
    y = to_data_format(x, "channels_first")
    assert y.shape == (2, 5, 3, 4) and y.flags.c_contiguous
    assert y[1, 4, 2, 3] == x[1, 2, 3, 4]
    with pytest.raises(ValueError, match="got 'NCHW'"):
        to_data_format(x, "NCHW")
    seq = x[0]  # (N, steps, features) -> (N, features, steps), as Keras' Conv1D
    assert to_data_format(seq, "channels_first").shape == (3, 5, 4)
    np.testing.assert_array_equal(to_data_format(seq[:, 0], "channels_first"), seq[:, 0])
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        to_data_format(x[0, 0, 0], "channels_first")


def test_load_npz_accepts_integer_valued_float_labels_and_tabular_and_sequence_x(tmp_path):
    for x_shape in [(6, 7), (6, 4, 7)]:
        arrays = {"x_train": np.ones(x_shape, np.float32), "x_test": np.ones((4,) + x_shape[1:],
                                                                            np.float32),
                  "y_train": np.array([0, 1, 2, 0, 1, 2], np.float64),
                  "y_test": np.array([2, 1, 0, 0], np.float32)}
        path = tmp_path / f"d{len(x_shape)}.npz"
        np.savez(path, **arrays)
        x_train, y_train, x_test, y_test = load_npz(path, num_classes=3)
        assert x_train.shape == x_shape and y_train.dtype == np.int64
        np.testing.assert_array_equal(y_test, [2, 1, 0, 0])


# --- shuffling and sharding ----------------------------------------------------------------


def test_epoch_permutation():
    p = epoch_permutation(100, seed=7, epoch=2)
    np.testing.assert_array_equal(p, epoch_permutation(100, 7, 2))  # every rank agrees
    np.testing.assert_array_equal(p, np.random.default_rng([7, 2]).permutation(100))
    np.testing.assert_array_equal(np.sort(p), np.arange(100))
    assert not np.array_equal(p, epoch_permutation(100, 7, 3))
    assert not np.array_equal(p, epoch_permutation(100, 8, 2))
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        epoch_permutation(10, 0, -1)


@pytest.mark.parametrize("n,batch,drop_last,sizes", [
    (10, 4, False, [4, 4, 2]),
    (10, 4, True, [4, 4]),
    (8, 4, True, [4, 4]),
    (3, 8, False, [3]),
    (3, 8, True, []),
])
def test_global_batches(n, batch, drop_last, sizes):
    batches = list(global_batches(n, batch, seed=1, epoch=0, drop_last=drop_last))
    assert [len(b) for b in batches] == sizes
    assert steps_per_epoch(n, batch, drop_last) == len(sizes)
    if batches:
        joined = np.concatenate(batches)
        np.testing.assert_array_equal(joined, epoch_permutation(n, 1, 0)[:len(joined)])
        assert len(set(joined.tolist())) == len(joined)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_shards_cover_the_global_batch_exactly_once(world_size):
    for length in range(0, 13):
        slices = [shard_slice(length, r, world_size) for r in range(world_size)]
        covered = np.concatenate([np.arange(length)[s] for s in slices])
        np.testing.assert_array_equal(covered, np.arange(length))  # in order, once each
        sizes = [s.stop - s.start for s in slices]
        base, rem = divmod(length, world_size)
        assert sizes == [base + 1] * rem + [base] * (world_size - rem)
        if length < world_size:
            assert sizes.count(0) == world_size - length  # empty shards at the end


def test_shard_slice_errors():
    with pytest.raises(ValueError, match="rank must be < world_size=2, got 2"):
        shard_slice(4, 2, 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1, got 0"):
        shard_slice(4, 0, 0)
    with pytest.raises(ValueError, match="global_batch_len must be an int >= 0, got -1"):
        shard_slice(-1, 0, 1)


@pytest.mark.parametrize("n,batch,drop_last", [(10, 4, False), (10, 4, True), (12, 4, False),
                                               (5, 7, False)])
def test_batch_at_matches_epoch_iteration(n, batch, drop_last):
    schedule = BatchSchedule(n, batch, seed=5, drop_last=drop_last)
    per_epoch = schedule.steps_per_epoch
    assert per_epoch == steps_per_epoch(n, batch, drop_last)
    step = 0
    for epoch in range(3):
        for position, expected in enumerate(global_batches(n, batch, 5, epoch, drop_last)):
            got_epoch, got_position, indices = schedule.batch_at(step)
            assert (got_epoch, got_position) == (epoch, position)
            np.testing.assert_array_equal(indices, expected)
            # A fresh schedule (a resumed run) and the function agree, out of order too.
            np.testing.assert_array_equal(batch_at(step, n, batch, 5, drop_last)[2], expected)
            step += 1
    assert step == 3 * per_epoch
    np.testing.assert_array_equal(schedule.batch_at(1)[2], batch_at(1, n, batch, 5, drop_last)[2])


def test_batch_schedule_without_batches():
    with pytest.raises(ValueError, match="no batches: n=3 samples with global_batch_size=8"):
        BatchSchedule(3, 8, seed=0, drop_last=True)


def test_memory_mapped_data_trains_reading_only_the_rows_it_uses(tmp_path):
    """A 25.6 MB training set trained within 4 MB of allocations (numpy's, traced): the
    ranks' slices are read from the mapped file, never the whole array. (The mapped
    file's pages live in the page cache, which the kernel reclaims under pressure.)"""
    import io
    import tracemalloc

    from distbn import LocalStrategy
    from distbn.train.config import parse_config
    from distbn.train.trainer import Trainer

    n, features = 100_000, 64
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    x = np.lib.format.open_memmap(data / "x_train.npy", mode="w+", dtype=np.float32,
                                  shape=(n, features))
    for start in range(0, n, 10_000):
        x[start:start + 10_000] = rng.normal(size=(10_000, features))
    x.flush()
    del x
    np.save(data / "y_train.npy", rng.integers(0, 3, n))
    np.save(data / "x_test.npy", rng.normal(size=(50, features)).astype(np.float32))
    np.save(data / "y_test.npy", rng.integers(0, 3, 50).astype(np.float64))
    config = parse_config(textwrap.dedent(f"""\
        data: {{name: npy, path: {data}, num_classes: 3}}
        model:
          layers: [{{type: Dense, units: 8}}, {{type: BatchNormalization}},
                   {{type: ReLU}}, {{type: Dense, units: 3}}]
        train: {{from_logits: true, global_batch_size: 32, steps: 20}}
        logging: {{progress: none}}
    """))
    Trainer(config, LocalStrategy(), out=io.StringIO()).fit()  # kernels loaded, imports done
    tracemalloc.start()
    try:
        trainer = Trainer(config, LocalStrategy(), out=io.StringIO())
        assert len(trainer.dataset.x_train) == n
        summary = trainer.fit()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["steps"] == 20 and summary["test_samples"] == 50
    assert peak < 4 * 2**20, f"{peak} bytes allocated at the peak"
    # The check has teeth: loading the array would have allocated all of it.
    tracemalloc.start()
    np.load(data / "x_train.npy")
    whole = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert whole > 6 * peak
