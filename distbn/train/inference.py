"""Using a trained run: `load_model`, and what `distbn evaluate`, `predict` and `export`
do with a run directory (its config.yaml and model.npz).

The model is rebuilt from the resolved config.yaml and takes model.npz's weights, so it
is the model the run saved: replica-local moving statistics averaged, synchronized ones
as trained. Nothing here writes into the run directory.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from distbn.train import builder
from distbn.train.config import load_config
from distbn.train.data import DataError
from distbn.train.rundir import CONFIG_FILE, MODEL_FILE

__all__ = ["PRECISE_FILE", "RunError", "load_config_of", "load_model", "predict_sharded",
           "prepare_evaluation", "prepare_inputs", "read_inputs", "sample_shape"]

#: What `distbn recalibrate` writes beside model.npz: the same weights with PreciseBN
#: moving statistics.
PRECISE_FILE = "model.precise.npz"


class RunError(ValueError):
    """A run directory (or an input file) that cannot be used; the message says why."""


def load_config_of(run_dir, overrides=()):
    """The resolved config a run saved (its config.yaml), with `overrides` applied."""
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunError(f"{run_dir!s} is not a run directory: it has no {CONFIG_FILE}")
    return load_config(path, overrides)


def _npz_member_shape(path, key) -> tuple:
    """The shape of array `key` in an .npz, read from its header only."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        shape, _, _ = np.lib.format._read_array_header(fh, version)  # noqa: SLF001
    return tuple(shape)


def sample_shape(config) -> tuple:
    """One input sample's shape in the model's data format, without loading the data."""
    d, m = config.data, config.model
    if d.name == "patterns":
        shape = (d.image_size, d.image_size, 3)
    elif d.name == "npy":
        shape = np.load(os.path.join(d.path, "x_train.npy"), mmap_mode="r").shape[1:]
    else:
        try:
            shape = _npz_member_shape(d.path, "x_train")[1:]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"{d.path}: cannot read x_train's shape: {exc}") from exc
    if m.data_format == "channels_first" and len(shape) >= 2:
        shape = (shape[-1],) + shape[:-1]
    return tuple(shape)


def load_model(run_dir):
    """The model a run trained, with its final weights, ready for `predict(x)`.

    Args:
        run_dir: a run directory of `distbn train` (config.yaml and model.npz).

    Returns:
        A built `Sequential` (or `Model`) with model.npz's weights.

    Raises:
        RunError: no config.yaml or model.npz (an unfinished run has only checkpoints),
            or weights that do not fit the config's model.
    """
    config = load_config_of(run_dir)
    model = builder.build_model(config, sample_shape(config), config.data.num_classes)
    try:
        model.set_weight_dict(_final_weights(run_dir))
    except ValueError as exc:
        raise RunError(f"{run_dir}/{MODEL_FILE}: does not fit the model of {CONFIG_FILE}: "
                       f"{exc}") from exc
    return model


def _final_weights(run_dir, weights=None) -> dict:
    """model.npz's arrays, or those of the `weights` file (e.g. model.precise.npz)."""
    if weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise RunError(f"weights file {path!r} does not exist")
    else:
        path = os.path.join(os.fspath(run_dir), MODEL_FILE)
        if not os.path.isfile(path):
            raise RunError(f"{run_dir!s} has no {MODEL_FILE}: the run has not finished (its "
                           "checkpoints resume with `distbn train ... --run-dir`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise RunError(f"{path}: cannot read as .npz: {exc}") from exc


def read_inputs(path, key="x"):
    """The array `key` of an .npz (never unpickled), for `predict`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RunError(f"input file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise RunError(f"{path}: has no array {key!r} (has: {', '.join(z.files)}); "
                               "name it with --key")
            return z[key]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise RunError(f"{path}: cannot read as .npz: {exc}") from exc


def prepare_evaluation(run_dir, strategy, data=None, weights=None):
    """A `Trainer` holding a run's final model, for `evaluate` and `recalibrate` (local
    work only).

    Args:
        run_dir: the run directory.
        strategy: the world strategy; `evaluate` shards the split over its replicas.
        data: an .npz with x_train, y_train, x_test, y_test to use instead of the run's
            data (samples of the run's shape).
        weights: a weights .npz to use instead of RUN_DIR/model.npz (the same keys, e.g.
            `distbn recalibrate`'s model.precise.npz).

    Returns:
        The trainer; `trainer.evaluate(split)` (collective) gives loss and accuracy.
    """
    import io

    from distbn.train.trainer import Trainer

    overrides = []
    if data is not None:
        overrides = ["data.name=npz", f"data.path={os.path.abspath(os.fspath(data))}",
                     "data.n_train=null", "data.n_test=null"]
    config = load_config_of(run_dir, overrides)
    values = _final_weights(run_dir, weights)
    trainer = Trainer(config, strategy, out=io.StringIO())
    try:
        trainer.model.set_weight_dict(values)
    except ValueError as exc:
        source = f"{run_dir}/{MODEL_FILE}" if weights is None else os.fspath(weights)
        raise RunError(f"{source} does not fit the model for these data: {exc}") from exc
    return trainer


def prepare_inputs(config, x):
    """Channels-last samples (as in the .npz data) in the model's dtype and layout,
    checked against the model's sample shape."""
    from distbn.train.data import to_data_format

    x = np.asarray(x)
    want = sample_shape(config)
    if x.ndim >= 2:
        x = to_data_format(x.astype(config.model.dtype, copy=False), config.model.data_format)
    if x.ndim < 2 or tuple(x.shape[1:]) != want:
        raise RunError(f"inputs have samples of shape {tuple(x.shape[1:])} (in the model's "
                       f"layout), the model takes {want}")
    return x


def predict_sharded(model, x, strategy, batch_size=256):
    """`model.predict` of each replica's slice of `x`, gathered on every rank
    (collective); the same rows, in order, as one process predicting all of `x`."""
    from distbn.train.data import shard_slice

    part = shard_slice(len(x), strategy.replica_id, strategy.num_replicas_in_sync)
    mine = model.predict(x[part], batch_size=batch_size)
    if strategy.num_replicas_in_sync == 1:
        return mine
    return np.concatenate(strategy.allgather_object(mine, name="predict"))
