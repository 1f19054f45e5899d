"""Data for the trainer: the embedded `patterns` set, user `.npz` files, and sharding.

Data parallelism here means: every rank draws the same permutation of the training
set for an epoch (seeded by the config seed and the epoch number), cuts it into the
same global batches, and takes its own contiguous slice of each global batch
(`shard_slice`). No rank needs to talk to another to agree on who reads what.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np

from distbn.checks import check_int
from distbn.distribute.sharding import shard_slice  # noqa: F401  (re-exported)

__all__ = [
    "MappedSamples",
    "load_npz_masks",
    "open_npy_dir",
    "DataError",
    "PATTERN_CLASSES",
    "make_patterns",
    "load_npz",
    "epoch_permutation",
    "steps_per_epoch",
    "global_batches",
    "shard_slice",
    "batch_at",
    "BatchSchedule",
    "to_data_format",
]

# One name per class of `make_patterns`, in label order.
PATTERN_CLASSES = (
    "stripes_0", "stripes_45", "stripes_90", "stripes_135", "checkerboard",
    "rings", "blob", "squares", "pinwheel", "texture",
)

# Mixed into the seed so the generator's streams never coincide with the shuffling
# streams `default_rng([seed, epoch])` of the same seed.
_PATTERNS_STREAM = 0x70617474  # "patt"

# Class colours (RGB in [0, 1]); each sample's foreground only leans towards its class
# colour, so colour is a weak hint and shape has to do the work.
_CLASS_COLOURS = np.array([
    [0.90, 0.20, 0.20], [0.20, 0.80, 0.30], [0.25, 0.35, 0.95], [0.90, 0.80, 0.20],
    [0.80, 0.30, 0.85], [0.20, 0.80, 0.85], [0.95, 0.55, 0.15], [0.55, 0.55, 0.55],
    [0.55, 0.85, 0.40], [0.45, 0.30, 0.70],
])


class DataError(ValueError):
    """A data set that cannot be used: the message names the array and what is wrong."""


# --------------------------------------------------------------------------------------
# The embedded data set


def _stripes(angle_deg):
    def draw(rng, m, yy, xx, size):
        theta = np.deg2rad(angle_deg + rng.uniform(-12.0, 12.0, m))[:, None, None]
        period = rng.uniform(3.0, 6.0, m)[:, None, None]
        phase = rng.uniform(0.0, 2 * np.pi, m)[:, None, None]
        u = xx * np.cos(theta) + yy * np.sin(theta)
        return np.sin(2 * np.pi * u / period + phase)
    return draw


def _centre(rng, m, size):
    cy = rng.uniform(0.2 * size, 0.8 * size, m)[:, None, None]
    cx = rng.uniform(0.2 * size, 0.8 * size, m)[:, None, None]
    return cy, cx


def _checkerboard(rng, m, yy, xx, size):
    cell = rng.uniform(2.0, 4.0, m)[:, None, None]
    oy, ox = (rng.uniform(0.0, 2 * np.pi, m)[:, None, None] for _ in range(2))
    p = np.sin(np.pi * yy / cell + oy) * np.sin(np.pi * xx / cell + ox)
    return np.tanh(4.0 * p)  # soft squares rather than a plaid


def _rings(rng, m, yy, xx, size):
    cy, cx = _centre(rng, m, size)
    period = rng.uniform(3.0, 6.0, m)[:, None, None]
    phase = rng.uniform(0.0, 2 * np.pi, m)[:, None, None]
    r = np.hypot(yy - cy, xx - cx)
    return np.cos(2 * np.pi * r / period + phase)


def _blob(rng, m, yy, xx, size):
    cy, cx = _centre(rng, m, size)
    sigma = rng.uniform(0.1 * size, 0.22 * size, m)[:, None, None]
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return 2.0 * np.exp(-r2 / (2 * sigma**2)) - 1.0


def _squares(rng, m, yy, xx, size):
    cy, cx = _centre(rng, m, size)
    period = rng.uniform(3.0, 6.0, m)[:, None, None]
    phase = rng.uniform(0.0, 2 * np.pi, m)[:, None, None]
    r = np.maximum(np.abs(yy - cy), np.abs(xx - cx))  # Chebyshev distance: square rings
    return np.cos(2 * np.pi * r / period + phase)


def _pinwheel(rng, m, yy, xx, size):
    cy, cx = _centre(rng, m, size)
    arms = rng.integers(3, 6, m)[:, None, None]
    phase = rng.uniform(0.0, 2 * np.pi, m)[:, None, None]
    return np.sin(arms * np.arctan2(yy - cy, xx - cx) + phase)


def _texture(rng, m, yy, xx, size):
    # Low-pass filtered white noise: blotches with no orientation or centre.
    noise = rng.standard_normal((m, size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    lowpass = np.exp(-(fy**2 + fx**2) / (2 * 0.08**2))
    p = np.fft.irfft2(np.fft.rfft2(noise) * lowpass, s=(size, size))
    return p / np.max(np.abs(p), axis=(1, 2), keepdims=True)


_DRAW = (
    _stripes(0), _stripes(45), _stripes(90), _stripes(135), _checkerboard,
    _rings, _blob, _squares, _pinwheel, _texture,
)


def _draw_split(rng, n, image_size, num_classes, dtype):
    # Exactly balanced labels (counts differ by at most one), in random order.
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    x = np.empty((n, image_size, image_size, 3), dtype=dtype)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float64)
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        m = idx.size
        if m == 0:
            continue
        p = _DRAW[c](rng, m, yy, xx, image_size)  # (m, H, W) in [-1, 1]
        lean = rng.uniform(0.2, 0.5, (m, 1))
        fg = lean * _CLASS_COLOURS[c] + (1 - lean) * rng.uniform(0.0, 1.0, (m, 3))
        bg = rng.uniform(0.0, 1.0, (m, 3))
        # The image maths runs in float32 whatever `dtype` is: half the time and memory,
        # and a float64 data set holds exactly the values of the float32 one.
        w = (0.5 * (p + 1.0)).astype(np.float32)[..., None]
        img = bg.astype(np.float32)[:, None, None, :] \
            + (fg - bg).astype(np.float32)[:, None, None, :] * w
        # Per-sample contrast and brightness (and a per-channel tint), then sensor noise:
        # the nuisance that per-batch normalisation removes.
        contrast = np.exp(rng.uniform(np.log(0.35), np.log(1.6), m))[:, None, None, None]
        bright = rng.uniform(-0.35, 0.35, (m, 1, 1, 1)) + rng.uniform(-0.1, 0.1, (m, 1, 1, 3))
        sigma = rng.uniform(0.02, 0.12, (m, 1, 1, 1))
        img -= np.float32(0.5)
        img *= contrast.astype(np.float32)
        img += (0.5 + bright).astype(np.float32)
        img += sigma.astype(np.float32) * rng.standard_normal(img.shape, dtype=np.float32)
        x[idx] = img
    return x, y


def make_patterns(n_train, n_test, image_size=16, num_classes=10, seed=0, dtype="float32"):
    """Generate the embedded `patterns` data set (no download, deterministic).

    Ten classes of procedurally drawn RGB images: gratings at four orientations, a
    checkerboard, circular rings, a blob, square rings, a pinwheel and a blotchy
    texture, each with random phase/position/scale, a foreground colour that only leans
    towards a class colour, per-sample contrast, brightness and tint, and noise. Pixel
    values are not normalised (mean about 0.5, std about 0.3, tails to about -1 and 2).
    Train and test come from separate random streams, so changing `n_test` leaves the
    training set unchanged.

    Args:
        n_train: number of training samples (>= 0).
        n_test: number of test samples (>= 0).
        image_size: height and width in pixels (>= 4).
        num_classes: number of classes, 1..10 (the first `num_classes` patterns).
        seed: non-negative int.
        dtype: "float32" or "float64".

    Returns:
        `(x_train, y_train, x_test, y_test)`: x is NHWC `(n, image_size, image_size, 3)`
        of `dtype`, y is int64 `(n,)` with every class present in equal numbers (+-1).
    """
    for name, value, low in (("n_train", n_train, 0), ("n_test", n_test, 0),
                             ("image_size", image_size, 4), ("seed", seed, 0)):
        check_int(value, name, minimum=low, what=f"an int >= {low}", named=False,
                  where="make_patterns")
    check_int(num_classes, "num_classes", minimum=1, maximum=len(_DRAW),
              what=f"an int in 1..{len(_DRAW)}", named=False, where="make_patterns")
    if dtype not in ("float32", "float64", np.float32, np.float64):
        raise ValueError(f"make_patterns: dtype must be 'float32' or 'float64', got {dtype!r}")
    dtype = np.dtype(dtype)
    seq = np.random.SeedSequence([int(seed), _PATTERNS_STREAM])
    train_seq, test_seq = seq.spawn(2)
    x_train, y_train = _draw_split(np.random.default_rng(train_seq), int(n_train),
                                   int(image_size), int(num_classes), dtype)
    x_test, y_test = _draw_split(np.random.default_rng(test_seq), int(n_test),
                                 int(image_size), int(num_classes), dtype)
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------------------
# User data


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _check_x(name, x):
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)  # image bytes -> [0, 1]
    elif x.dtype.kind != "f":
        raise DataError(f"{name}: expected a float or uint8 array, got dtype {x.dtype}")
    elif x.dtype == np.float16:
        x = x.astype(np.float32)  # computed in float32 anyway; avoid float16 sums
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{name}: expected (N, features), (N, steps, features) or NHWC "
                        f"images (N, height, width, channels), got shape {x.shape}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise DataError(f"{name}: non-finite value {x[bad].item()!r} at index {bad}")
    return x


def _check_y(name, y, n, num_classes):
    if y.ndim == 2 and y.shape[0] == n and y.size and np.isin(y, (0, 1)).all() and (
            y.sum(axis=1) == 1).all():
        raise DataError(f"{name}: labels look one-hot (shape {y.shape}); store class ids "
                        "instead, e.g. np.argmax(y, axis=1)")
    if y.dtype.kind == "f":
        bad = y != np.round(y)
        if bad.any():
            raise DataError(f"{name}: labels must be integer class ids, got "
                            f"{y[bad].flat[0].item()!r} (dtype {y.dtype})")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{name}: expected integer class labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"{name}: expected a 1-D label array, got shape {y.shape}")
    if y.shape[0] != n:
        raise DataError(f"{name}: has {y.shape[0]} labels but x has {n} samples")
    if y.size:
        low, high = int(y.min()), int(y.max())
        if low < 0:
            raise DataError(f"{name}: labels must be >= 0, got {low}")
        if num_classes is not None and high >= num_classes:
            raise DataError(
                f"{name}: labels must be < num_classes={num_classes}, got {high}"
            )
    return y.astype(np.int64)


def load_npz(path, num_classes=None):
    """Load and validate a user data set from an `.npz` file (never unpickles).

    Args:
        path: file with arrays `x_train, y_train, x_test, y_test` (other arrays are
            ignored). x: float, or uint8 (scaled to float32 in [0, 1]), of shape
            (N, features), (N, steps, features) or NHWC (N, height, width, channels);
            y: 1-D class ids (integers, or integer-valued floats).
        num_classes: if given, every label must lie in `[0, num_classes)`.

    Returns:
        `(x_train, y_train, x_test, y_test)`, x float (float16 widened to float32), y int64.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if not magic.startswith(b"PK") and not magic.startswith(b"\x93NUMPY"):
        # np.load would try pickle on it and talk about allow_pickle
        raise DataError(f"{path}: not an .npz archive (a zip of .npy arrays, as written by "
                        f"np.savez); its first bytes are {magic!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # a damaged zip: say which file
        raise DataError(f"{path}: cannot read as .npz: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected an .npz archive, got a single .npy array")
    with archive:
        missing = [k for k in _NPZ_KEYS if k not in archive.files]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {', '.join(missing)} (has: {', '.join(archive.files)})"
            )
        arrays = {}
        for key in _NPZ_KEYS:
            try:
                arrays[key] = archive[key]
            except ValueError as err:  # object arrays need pickle, which is refused
                raise DataError(f"{path}: {key}: cannot load ({err})") from err
    x_train = _check_x(f"{path}: x_train", arrays["x_train"])
    x_test = _check_x(f"{path}: x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: x_test: sample shape {x_test.shape[1:]} differs from "
            f"x_train's {x_train.shape[1:]}"
        )
    if x_train.shape[0] == 0:
        raise DataError(f"{path}: x_train: has no samples, shape {x_train.shape}")
    y_train = _check_y(f"{path}: y_train", arrays["y_train"], x_train.shape[0], num_classes)
    y_test = _check_y(f"{path}: y_test", arrays["y_test"], x_test.shape[0], num_classes)
    return x_train, y_train, x_test, y_test


_MASK_KEYS = ("mask_train", "mask_test")


def load_npz_masks(path, x_train_shape, x_test_shape):
    """The optional `mask_train` and `mask_test` arrays of a sequence .npz.

    A mask is (N, steps), boolean or 0/1, one per split (both or neither), for x of
    shape (N, steps, features): True marks the steps that count (Keras' convention).

    Returns:
        (mask_train, mask_test) as bool arrays, or (None, None) without masks.
    """
    with np.load(os.fspath(path), allow_pickle=False) as archive:
        present = [k for k in _MASK_KEYS if k in archive.files]
        if not present:
            return None, None
        if len(present) == 1:
            other = _MASK_KEYS[1 - _MASK_KEYS.index(present[0])]
            raise DataError(f"{path}: has {present[0]} but not {other}: give both or neither")
        masks = {k: archive[k] for k in _MASK_KEYS}
    out = []
    for key, shape in zip(_MASK_KEYS, (x_train_shape, x_test_shape), strict=True):
        m = masks[key]
        if len(shape) != 3:
            raise DataError(f"{path}: {key}: masks are for (N, steps, features) x, but x has "
                            f"shape {tuple(shape)}")
        if m.shape != tuple(shape[:2]):
            raise DataError(f"{path}: {key}: expected shape {tuple(shape[:2])} (N, steps), "
                            f"got {m.shape}")
        if m.dtype != bool and not (m.dtype.kind in "iuf" and np.isin(m, (0, 1)).all()):
            raise DataError(f"{path}: {key}: expected booleans or 0/1, got dtype {m.dtype}")
        out.append(m.astype(bool))
    return out[0], out[1]


class MappedSamples:
    """Samples of a memory-mapped .npy file, converted a batch at a time.

    Indexing (`x[rows]`, `x[a:b]`) reads only those rows from the file and returns them
    as a float array in the model's dtype and layout (uint8 scaled to [0, 1]); `len` and
    `shape` come from the header. So a rank touches only the rows of its slices, and a
    data set larger than one rank's memory trains.

    Args:
        mapped: the read-only `np.memmap` (or `np.load(..., mmap_mode="r")`) array.
        dtype: the model dtype.
        data_format: "channels_last" or "channels_first".
    """

    def __init__(self, mapped, dtype, data_format):
        self._mapped = mapped
        self._dtype = np.dtype(dtype)
        self._format = data_format
        sample = to_data_format(np.zeros((1,) + mapped.shape[1:], np.float32), data_format)
        self.shape = (mapped.shape[0],) + sample.shape[1:]
        self.dtype = self._dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        rows = np.asarray(self._mapped[index])
        if rows.dtype == np.uint8:
            rows = rows.astype(np.float32) / np.float32(255.0)
        return to_data_format(rows.astype(self._dtype, copy=False), self._format)

    def __repr__(self) -> str:
        return f"MappedSamples(shape={self.shape}, dtype={self._dtype})"


def open_npy_dir(path, num_classes=None):
    """Open a directory of x_train.npy, y_train.npy, x_test.npy, y_test.npy (np.save).

    The x arrays are memory-mapped read-only and checked from their headers only (dtype,
    shape; their values are not scanned, so a non-finite sample shows up as a
    non-finite loss at its step); the labels are read and validated as for `load_npz`.

    Returns:
        `(x_train, y_train, x_test, y_test)`: x as read-only memory maps, y int64.
    """
    path = os.fspath(path)
    arrays = {}
    for key in _NPZ_KEYS:
        file = os.path.join(path, f"{key}.npy")
        if not os.path.isfile(file):
            raise DataError(f"{path}: missing {key}.npy (a data directory holds "
                            f"{', '.join(k + '.npy' for k in _NPZ_KEYS)})")
        try:
            arrays[key] = np.load(file, mmap_mode="r" if key.startswith("x") else None,
                                  allow_pickle=False)
        except ValueError as err:  # object arrays need pickle, which is refused
            raise DataError(f"{file}: cannot load ({err})") from err
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.dtype != np.uint8 and x.dtype.kind != "f":
            raise DataError(f"{path}: {key}: expected a float or uint8 array, got dtype "
                            f"{x.dtype}")
        if x.ndim not in (2, 3, 4):
            raise DataError(f"{path}: {key}: expected (N, features), (N, steps, features) "
                            f"or NHWC images, got shape {x.shape}")
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x_test: sample shape {x_test.shape[1:]} differs from "
                        f"x_train's {x_train.shape[1:]}")
    if x_train.shape[0] == 0:
        raise DataError(f"{path}: x_train: has no samples, shape {x_train.shape}")
    y_train = _check_y(f"{path}: y_train", arrays["y_train"], x_train.shape[0], num_classes)
    y_test = _check_y(f"{path}: y_test", arrays["y_test"], x_test.shape[0], num_classes)
    return x_train, y_train, x_test, y_test


def to_data_format(x, data_format):
    """Convert a channels-last batch to the model's layout.

    Args:
        x: (N, features), (N, steps, features) or NHWC (N, height, width, channels).
        data_format: "channels_last" (returned unchanged) or "channels_first" (a copy
            with the channel axis second: (N, features, steps) or NCHW; 2-D unchanged).

    Returns:
        The array in `data_format` layout.
    """
    x = np.asarray(x)
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"to_data_format: expected a 2-D, 3-D or 4-D array, got shape "
                         f"{x.shape}")
    if data_format == "channels_last" or x.ndim == 2:
        return x
    if data_format == "channels_first":
        return np.ascontiguousarray(np.moveaxis(x, -1, 1))
    raise ValueError(
        f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}"
    )


# --------------------------------------------------------------------------------------
# Shuffling and sharding


def _check_int(name, value, low):
    return check_int(value, name, minimum=low, what=f"an int >= {low}", named=False)


def epoch_permutation(n, seed, epoch):
    """The shuffled order of `n` samples for one epoch, identical on every rank.

    Args:
        n: number of samples.
        seed: non-negative int (the config's `seed`).
        epoch: epoch number, from 0.

    Returns:
        int64 array: a permutation of `range(n)` from `np.random.default_rng([seed, epoch])`.
    """
    n = _check_int("n", n, 0)
    rng = np.random.default_rng([_check_int("seed", seed, 0), _check_int("epoch", epoch, 0)])
    return rng.permutation(n).astype(np.int64)


def steps_per_epoch(n, global_batch_size, drop_last=False):
    """Number of global batches in one epoch.

    Args:
        n: number of samples.
        global_batch_size: samples per step over all ranks.
        drop_last: drop the final short batch.

    Returns:
        `n // global_batch_size` with `drop_last`, else `ceil(n / global_batch_size)`.
    """
    n = _check_int("n", n, 0)
    global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
    return n // global_batch_size if drop_last else math.ceil(n / global_batch_size)


def global_batches(n, global_batch_size, seed, epoch, drop_last=False) -> Iterator[np.ndarray]:
    """Yield the global batches of one epoch as arrays of sample indices.

    Args:
        n: number of samples.
        global_batch_size: samples per step over all ranks.
        seed: non-negative int.
        epoch: epoch number, from 0.
        drop_last: drop the final batch if it is shorter than `global_batch_size`.

    Returns:
        An iterator of int64 index arrays (the last may be short unless `drop_last`).
    """
    count = steps_per_epoch(n, global_batch_size, drop_last)
    perm = epoch_permutation(n, seed, epoch)
    for i in range(count):
        yield perm[i * global_batch_size:(i + 1) * global_batch_size]


class BatchSchedule:
    """Step-indexed global batches that run on across epochs ("steps" mode, resuming).

    Step `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`, the same
    batch that `global_batches(..., epoch)` yields at that position, so a run resumed
    at step `s` reads exactly what an uninterrupted run would have read.

    Args:
        n: number of training samples.
        global_batch_size: samples per step over all ranks.
        seed: non-negative int.
        drop_last: drop each epoch's final short batch.
    """

    def __init__(self, n, global_batch_size, seed, drop_last=False):
        self.n = _check_int("n", n, 0)
        self.global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.drop_last = bool(drop_last)
        self.steps_per_epoch = steps_per_epoch(self.n, self.global_batch_size, self.drop_last)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"no batches: n={self.n} samples with global_batch_size="
                f"{self.global_batch_size} and drop_last={self.drop_last}"
            )
        self._epoch = None
        self._perm = None

    def batch_at(self, step):
        """The global batch of a step.

        Args:
            step: global step number, from 0.

        Returns:
            `(epoch, position, indices)`: the epoch, the batch's position within it, and
            the int64 sample indices of the global batch.
        """
        step = _check_int("step", step, 0)
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, reused across its steps
            self._perm = epoch_permutation(self.n, self.seed, epoch)
            self._epoch = epoch
        start = position * self.global_batch_size
        return epoch, position, self._perm[start:start + self.global_batch_size]


def batch_at(step, n, global_batch_size, seed, drop_last=False):
    """The global batch of a step in "steps" mode (see `BatchSchedule`).

    Args:
        step: global step number, from 0.
        n: number of training samples.
        global_batch_size: samples per step over all ranks.
        seed: non-negative int.
        drop_last: drop each epoch's final short batch.

    Returns:
        `(epoch, position, indices)` as `BatchSchedule.batch_at`.
    """
    return BatchSchedule(n, global_batch_size, seed, drop_last).batch_at(step)
