"""The run directory: its default name, the checks made before training, and the writer.

Layout (a contract, see README "Training"):

    config.yaml     the resolved config (`config_to_yaml`)
    metrics.jsonl   one JSON object per line: logged training steps and evaluations
    model.npz       final weights, keys "<layer name>/<weight name>" (np.savez, no pickle)

Only rank 0 touches the directory; `check_run_dir` runs before anything is written so a
bad `--run-dir` is a usage error (exit 2) that leaves the file system as it was.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile

import numpy as np
import yaml

from distbn.jsonl import json_safe
from distbn.train.checkpoint import checkpoint_dir, list_checkpoints
from distbn.train.config import config_to_yaml

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "RunDirError",
    "default_run_dir",
    "check_run_dir",
    "RunDir",
    "PreviousRun",
    "atomic_write",
    "previous_run",
    "clear_previous_run",
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


# A run is its seed, data and model: a config.yaml that changes one of them belongs to
# another run. The other sections may change when a run is resumed (more steps, a new
# learning rate, other logging).
_IDENTITY_SECTIONS = ("seed", "data", "model")


def _flatten(value, prefix="") -> dict:
    """{"a.b.0.c": leaf} of nested dicts and lists."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat or {prefix: value}


@dataclasses.dataclass
class PreviousRun:
    """What a run directory already holds (see `previous_run`)."""

    files: list            # run files present: config.yaml, metrics.jsonl, model.npz
    checkpoints: list      # step numbers of the checkpoint directories
    changes: dict          # flat key -> (old, new) where its config.yaml differs
    unknown: bool          # run files, but no readable config.yaml

    @property
    def identity_changes(self) -> dict:
        """The changes in seed, data or model: these make it another run."""
        return {k: v for k, v in self.changes.items()
                if k.split(".")[0] in _IDENTITY_SECTIONS}

    def contents(self) -> str:
        """"config.yaml, model.npz, checkpoints at steps 6, 12" and the like."""
        parts = list(self.files)
        if self.checkpoints:
            steps = ", ".join(str(s) for s in self.checkpoints[-3:])
            more = f"{len(self.checkpoints) - 3} more and " if len(self.checkpoints) > 3 else ""
            parts.append(f"checkpoints at steps {more}{steps}")
        return ", ".join(parts)

    @staticmethod
    def describe(changes: dict, limit: int = 4) -> str:
        """"model.layers.0.filters (16 -> 8), ..." for the first `limit` changes."""
        shown = [f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(changes.items())[:limit]]
        if len(changes) > limit:
            shown.append(f"and {len(changes) - limit} more")
        return ", ".join(shown)


def previous_run(path, config) -> PreviousRun | None:
    """What `path` holds of an earlier run, compared with `config`; None if nothing.

    Reads only: config.yaml (parsed as YAML, compared key by key with the resolved
    `config`), the names of the run files and of the checkpoint directories.
    """
    full = os.fspath(path)
    if not os.path.isdir(full):
        return None
    files = [n for n in _RUN_FILES if os.path.isfile(os.path.join(full, n))]
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(full)]
    if not files and not steps:
        return None
    changes, unknown = {}, False
    try:
        with open(os.path.join(full, CONFIG_FILE), encoding="utf-8") as fh:
            old = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        old = None
    if isinstance(old, dict):
        before = _flatten(old)
        after = _flatten(yaml.safe_load(config_to_yaml(config)))
        changes = {k: (before.get(k), after.get(k)) for k in list(before) + list(after)
                   if before.get(k) != after.get(k)}
    else:
        unknown = True
    return PreviousRun(files, steps, changes, unknown)


def clear_previous_run(path) -> list[str]:
    """Remove a previous run's files from `path` (--overwrite): config.yaml,
    metrics.jsonl, model.npz and checkpoints/; nothing else. Returns what it removed."""
    removed = []
    for name in _RUN_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            os.remove(file)
            removed.append(name)
    ckpts = checkpoint_dir(path)
    if ckpts.is_dir():
        shutil.rmtree(ckpts)
        removed.append("checkpoints/")
    return removed


def atomic_write(path, write) -> None:
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
        atomic_write(self.file(CONFIG_FILE), lambda fh: fh.write(text))

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
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
        return path

    def close(self) -> None:
        """Close metrics.jsonl."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
