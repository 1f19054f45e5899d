"""The run directory: its default name, the checks made before training, and the writer.

Layout (a contract, see README "Training"):

    config.yaml     the resolved config (`config_to_yaml`)
    metrics.jsonl   one JSON object per line: logged training steps and evaluations
    model.npz       final weights, keys "<layer name>/<weight name>" (np.savez, no pickle)

Only rank 0 touches the directory; `check_run_dir` runs before anything is written so a
bad `--run-dir` is a usage error (exit 2) that leaves the file system as it was.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile

import numpy as np

from distbn.train.config import config_to_yaml

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "RunDirError",
    "default_run_dir",
    "check_run_dir",
    "RunDir",
    "json_safe",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.npz"
_RUN_FILES = (CONFIG_FILE, METRICS_FILE, MODEL_FILE)


class RunDirError(ValueError):
    """The run directory cannot be used (a file, not writable, ...); names the path."""


def default_run_dir(source, root="runs", now=None) -> str:
    """`<root>/<config stem>-<YYYYmmdd-HHMMSS>`, with `-2`, `-3`, ... if that exists.

    Args:
        source: the config's path (its stem names the run); "<string>" gives "run".
        root: the parent directory.
        now: a `datetime` (default: the current local time).

    Returns:
        A path that does not exist yet.
    """
    stem = os.path.splitext(os.path.basename(str(source)))[0]
    if not stem or stem.startswith("<"):
        stem = "run"
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, f"{stem}-{stamp}")
    candidate, n = path, 1
    while os.path.lexists(candidate):  # two runs started within one second
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def check_run_dir(path) -> str:
    """Check that `path` can be (created and) written as a run directory; writes nothing.

    Args:
        path: the run directory; it may exist (its run files are then replaced) or not
            (its nearest existing ancestor must be a writable directory).

    Returns:
        The path, unchanged. Raises `RunDirError` naming the problem.
    """
    path = os.fspath(path)
    if not path:
        raise RunDirError("run directory: got an empty path")
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if not os.path.isdir(full):
            raise RunDirError(f"run directory {path!r} exists and is not a directory")
        if not os.access(full, os.W_OK | os.X_OK):
            raise RunDirError(f"run directory {path!r} is not writable")
        for name in _RUN_FILES:
            inside = os.path.join(full, name)
            if os.path.isdir(inside):
                raise RunDirError(f"run directory {path!r}: {name!r} is a directory, "
                                  "where the run would write a file")
        return path
    parent = os.path.dirname(full)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"run directory {path!r} cannot be created: {parent!r} is not "
                          "a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {path!r} cannot be created: {parent!r} is not "
                          "writable")
    return path


def json_safe(value):
    """`value` with numpy scalars made Python and non-finite floats made None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write(path, write) -> None:
    """Write through `write(fileobj)` to a temporary file, then rename it over `path`,
    so a crash never leaves a half-written file under the final name."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class RunDir:
    """Rank 0's writer for one run directory.

    `create()` makes the directory and removes the run files a previous run left (so a
    stale model.npz is never mistaken for this run's); the other methods write them.

    Args:
        path: the directory (checked with `check_run_dir` first).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._metrics = None

    def file(self, name) -> str:
        """The path of a file inside the run directory."""
        return os.path.join(self.path, name)

    def create(self, keep_metrics_until=None) -> list[str]:
        """Create the directory; return the names of previous run files it removed.

        Args:
            keep_metrics_until: resuming from this step: keep metrics.jsonl's records up
                to it (later ones belong to steps that will run again) and append.
        """
        os.makedirs(self.path, exist_ok=True)
        metrics = self.file(METRICS_FILE)
        kept = []
        if keep_metrics_until is not None and os.path.isfile(metrics):
            with open(metrics, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line cut short by the kill that stopped the run
                        continue
                    if isinstance(record, dict) and record.get("step", 0) <= keep_metrics_until:
                        kept.append(line if line.endswith("\n") else line + "\n")
        removed = []
        for name in _RUN_FILES:
            if os.path.lexists(self.file(name)):
                os.remove(self.file(name))
                if not (name == METRICS_FILE and keep_metrics_until is not None):
                    removed.append(name)
        self._metrics = open(metrics, "w", encoding="utf-8")
        self._metrics.writelines(kept)
        self._metrics.flush()
        return removed

    def write_config(self, config) -> None:
        """Write the resolved config as config.yaml."""
        text = config_to_yaml(config).encode("utf-8")
        _atomic_write(self.file(CONFIG_FILE), lambda fh: fh.write(text))

    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (flushed, so `tail -f` and crashes see it)."""
        if self._metrics is None:
            raise RuntimeError("RunDir.log before create()")
        self._metrics.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._metrics.flush()

    def save_weights(self, weights: dict, name=MODEL_FILE) -> str:
        """Save `{"<layer>/<weight>": array}` with np.savez (plain arrays only, atomically).

        Returns:
            The file's path.
        """
        arrays = {}
        for key, value in weights.items():
            arr = np.asarray(value)
            if arr.dtype.hasobject:  # would need pickle to load
                raise TypeError(f"weight {key!r} is an object array; refusing to save it")
            arrays[key] = arr
        path = self.file(name)
        _atomic_write(path, lambda fh: np.savez(fh, **arrays))
        return path

    def close(self) -> None:
        """Close metrics.jsonl."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
