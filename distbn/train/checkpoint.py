"""Atomic checkpoints: a directory of `.npz` files and a JSON manifest, never pickle.

Layout: `RUN_DIR/checkpoints/step-NNNNNNNN/` holding one `.npz` per group of arrays
(`weights.npz`, `optimizer.npz`) and `manifest.json` (the caller's metadata plus the
SHA-256 of every file). A checkpoint is written into a hidden temporary directory beside
its final place, every file and the directory are fsynced, and only then is it renamed
into place: a reader sees a checkpoint whole or not at all, whatever moment a crash or
a kill hits. Loading verifies the hashes and refuses object arrays (no unpickling).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np

from distbn.faults import maybe_fail

__all__ = [
    "CheckpointError", "checkpoint_dir", "checkpoint_path", "list_checkpoints",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})$")
_GROUP = re.compile(r"^[A-Za-z0-9_]+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or must not be loaded; the message says why."""


def checkpoint_dir(run_dir) -> Path:
    """`RUN_DIR/checkpoints`."""
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir, step: int) -> Path:
    """`RUN_DIR/checkpoints/step-NNNNNNNN` for a step."""
    return checkpoint_dir(run_dir) / f"step-{int(step):08d}"


def _fault_point(where: str) -> None:
    """Called between the steps of a save; tests replace it to simulate a crash there."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_arrays(group: str, arrays: dict) -> dict:
    out = {}
    for key, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.hasobject or arr.dtype.kind not in "biuf":
            raise CheckpointError(
                f"checkpoint group {group!r}: array {key!r} has dtype {arr.dtype}; only "
                "numeric arrays are saved (no pickle)"
            )
        out[key] = arr
    return out


def _write_file(path: Path, data: bytes) -> str:
    """Write, fsync, and return the SHA-256 of `data`."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(run_dir, step: int, groups: dict, manifest: dict, keep: int = 3) -> Path:
    """Write a checkpoint atomically and keep only the newest `keep` ones.

    Args:
        run_dir: the run directory.
        step: the global step the checkpoint holds the state after.
        groups: file stem -> {array name -> numeric array}, e.g. {"weights": {...},
            "optimizer": {...}}; each becomes `<stem>.npz`.
        manifest: JSON-serialisable metadata; `step`, `format` and `files` (SHA-256 of
            each file) are added.
        keep: how many complete checkpoints to keep (older ones are removed).

    Returns:
        The checkpoint's directory.

    Raises:
        CheckpointError: a non-numeric array or a bad group name; nothing is written.
    """
    if int(keep) < 1:
        raise CheckpointError(f"keep must be >= 1, got {keep!r}")
    payloads = {}
    for group, arrays in groups.items():
        if not _GROUP.match(group):
            raise CheckpointError(f"bad checkpoint group name {group!r}")
        buf = io.BytesIO()
        np.savez(buf, **_check_arrays(group, arrays))
        payloads[f"{group}.npz"] = buf.getvalue()

    parent = checkpoint_dir(run_dir)
    parent.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _fault_point("mkdir")
    hashes = {}
    for name, data in payloads.items():
        hashes[name] = _write_file(tmp / name, data)
        _fault_point(f"write {name}")
    maybe_fail("checkpoint")  # DISTBN_FAULT: a failure with the arrays half-saved
    meta = dict(manifest, step=int(step), format=FORMAT_VERSION, files=hashes)
    _write_file(tmp / "manifest.json", json.dumps(meta, indent=2, sort_keys=True).encode())
    _fault_point("write manifest.json")
    _fsync_path(tmp)
    _fault_point("fsync dir")
    if final.exists():  # the same step saved again (a rerun): move the old one aside first
        old = parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        _fault_point("move old aside")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fault_point("rename")
    _fsync_path(parent)
    _prune(run_dir, keep)
    return final


def _prune(run_dir, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints, and leftovers of interrupted saves."""
    parent = checkpoint_dir(run_dir)
    for stale in parent.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in parent.glob(".old-step-*"):
        # An interrupted re-save: the old copy moved aside is only needed if the new one
        # is missing, in which case put it back.
        final = parent / stale.name.split("-", 1)[1].rsplit("-", 1)[0]
        if final.exists():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(stale, final)
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(run_dir) -> list[Path]:
    """Checkpoint directories under `run_dir`, oldest first (by step)."""
    parent = checkpoint_dir(run_dir)
    if not parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in parent.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path) -> tuple[dict, dict]:
    """Load and verify one checkpoint.

    Args:
        path: a `step-NNNNNNNN` directory.

    Returns:
        `(manifest, groups)` with groups: stem -> {array name -> array}.

    Raises:
        CheckpointError: missing or unreadable manifest, a file missing or not matching
            its SHA-256, an object array or any pickled content, a bad format version.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable manifest.json ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: manifest format {meta.get('format') if isinstance(meta, dict) else meta!r}"
            f" is not {FORMAT_VERSION}"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: manifest lists no files")
    groups = {}
    for name, expected in files.items():
        if not name.endswith(".npz") or not _GROUP.match(name[:-4]):
            raise CheckpointError(f"{path}: manifest names an unexpected file {name!r}")
        try:
            data = (path / name).read_bytes()
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read {name} ({err})") from err
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CheckpointError(
                f"{path}: {name} is corrupt (SHA-256 {actual[:16]}..., manifest says "
                f"{str(expected)[:16]}...)"
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except ValueError as err:  # object arrays need pickle: refused
            raise CheckpointError(f"{path}: {name} holds pickled data, refused ({err})") \
                from err
        for key, arr in arrays.items():
            if arr.dtype.hasobject:
                raise CheckpointError(f"{path}: {name} array {key!r} is an object array")
        groups[name[:-4]] = arrays
    return meta, groups


def latest_checkpoint(run_dir, warn=None) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that loads and verifies; broken ones are skipped with a warning.

    Args:
        run_dir: the run directory.
        warn: callable(message) for skipped checkpoints (default `warnings.warn`).

    Returns:
        `(path, manifest, groups)`, or None when there is no usable checkpoint.
    """
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    for path in reversed(list_checkpoints(run_dir)):
        try:
            meta, groups = load_checkpoint(path)
        except CheckpointError as err:
            warn(f"skipping checkpoint {path}: {err}")
            continue
        return path, meta, groups
    return None
