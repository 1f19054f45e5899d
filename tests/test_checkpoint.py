"""Checkpoints: atomic under simulated crashes, verified on load, never unpickled."""

import io
import json
import zipfile

import numpy as np
import pytest

from distbn.train import checkpoint as ckpt


def groups(value):
    return {"weights": {"dense/kernel": np.full((2, 3), value, np.float32),
                        "dense/bias": np.arange(3.0) + value},
            "optimizer": {"iterations": np.int64(value)}}


def test_round_trip(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 5, groups(1.0), {"epoch": 0})
    assert path.name == "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "optimizer.npz", "weights.npz"]
    meta, loaded = ckpt.load_checkpoint(path)
    assert meta["step"] == 5 and meta["epoch"] == 0 and set(meta["files"]) == {
        "weights.npz", "optimizer.npz"}
    np.testing.assert_array_equal(loaded["weights"]["dense/kernel"], np.full((2, 3), 1.0))
    assert loaded["optimizer"]["iterations"] == 1


def test_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        ckpt.save_checkpoint(tmp_path, step, groups(step), {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step-00000004", "step-00000005"]


FAULT_POINTS = ["mkdir", "write weights.npz", "write optimizer.npz",
                "write manifest.json", "fsync dir", "rename"]


@pytest.mark.parametrize("where", FAULT_POINTS)
def test_a_crash_anywhere_in_a_save_leaves_old_or_new(tmp_path, monkeypatch, where):
    ckpt.save_checkpoint(tmp_path, 1, groups(1.0), {})

    def crash(point):
        if point == where:
            raise KeyboardInterrupt(f"simulated crash at {point}")

    monkeypatch.setattr(ckpt, "_fault_point", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, groups(2.0), {})
    path, meta, loaded = ckpt.latest_checkpoint(tmp_path, warn=pytest.fail)
    # Before the rename nothing of step 2 is visible; after it, step 2 is whole.
    expected = 2 if where == "rename" else 1
    assert meta["step"] == expected
    np.testing.assert_array_equal(loaded["weights"]["dense/bias"], np.arange(3.0) + expected)
    # The next save cleans up what the crash left behind.
    monkeypatch.setattr(ckpt, "_fault_point", lambda point: None)
    ckpt.save_checkpoint(tmp_path, 3, groups(3.0), {})
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("where", ["move old aside", "rename"])
def test_a_crash_while_resaving_the_same_step_loses_nothing(tmp_path, monkeypatch, where):
    ckpt.save_checkpoint(tmp_path, 4, groups(1.0), {})

    def crash(point):
        if point == where:
            raise KeyboardInterrupt(point)

    monkeypatch.setattr(ckpt, "_fault_point", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, groups(2.0), {})
    monkeypatch.setattr(ckpt, "_fault_point", lambda point: None)
    ckpt._prune(tmp_path, keep=3)  # what the next save does first
    found = ckpt.latest_checkpoint(tmp_path, warn=pytest.fail)
    assert found is not None and found[1]["step"] == 4


def test_corrupt_file_is_skipped_with_a_warning(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, groups(1.0), {})
    newest = ckpt.save_checkpoint(tmp_path, 2, groups(2.0), {})
    data = bytearray((newest / "weights.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "weights.npz").write_bytes(bytes(data))
    warnings = []
    path, meta, _ = ckpt.latest_checkpoint(tmp_path, warn=warnings.append)
    assert meta["step"] == 1
    assert len(warnings) == 1 and "step-00000002" in warnings[0] and "corrupt" in warnings[0]


def test_partial_checkpoint_without_manifest_is_skipped(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, groups(1.0), {})
    broken = ckpt.save_checkpoint(tmp_path, 2, groups(2.0), {})
    (broken / "manifest.json").unlink()
    warnings = []
    assert ckpt.latest_checkpoint(tmp_path, warn=warnings.append)[1]["step"] == 1
    assert "unreadable manifest.json" in warnings[0]


def test_object_arrays_are_refused_on_save(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="'bad'.*object"):
        ckpt.save_checkpoint(tmp_path, 1, {"weights": {"bad": np.array([{}], object)}}, {})
    assert not (tmp_path / "checkpoints").exists() or not ckpt.list_checkpoints(tmp_path)


def test_pickle_inside_a_checkpoint_is_refused_even_with_a_matching_hash(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, groups(1.0), {})
    buf = io.BytesIO()
    np.savez(buf, evil=np.array([{"x": 1}], dtype=object))  # pickles the object array
    data = buf.getvalue()
    (path / "weights.npz").write_bytes(data)
    meta = json.loads((path / "manifest.json").read_text())
    import hashlib

    meta["files"]["weights.npz"] = hashlib.sha256(data).hexdigest()
    (path / "manifest.json").write_text(json.dumps(meta))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.namelist() == ["evil.npy"]
    with pytest.raises(ckpt.CheckpointError, match="pickled data, refused"):
        ckpt.load_checkpoint(path)
