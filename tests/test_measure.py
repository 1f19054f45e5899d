"""`python -m distbn.ops.measure`: the record it reports, on a small input."""

from __future__ import annotations

import json

import pytest

from distbn.ops import measure


@pytest.mark.parametrize("shape,axis", [((8, 4, 4, 8), -1), ((8, 8, 4, 4), 1)])
def test_measure_layer_record(shape, axis):
    rec = measure.measure_layer(shape, axis, threads=1, rounds=1)
    for key in ("copy_s", "stats_s", "normalize_s", "fwd_s", "fwdbwd_s"):
        assert rec[key] > 0, key
    assert rec["fwd_copy_fraction"] == pytest.approx(rec["copy_s"] / rec["fwd_s"])
    assert rec["two_pass_copy_fraction"] == pytest.approx(
        rec["copy_s"] / (rec["stats_s"] + rec["normalize_s"]))
    nbytes = 4 * 8 * 4 * 4 * 8
    assert rec["input_bytes"] == nbytes
    assert rec["peak_extra_bytes"] >= 2 * nbytes  # y and dx at least
    assert ("fwdbwd_vs_torch" in rec) == ("torch_fwdbwd_s" in rec)


def test_main_prints_a_table_and_writes_json(tmp_path, monkeypatch, capsys):
    import distbn.memory

    monkeypatch.setattr(measure, "LAYOUTS", (("tiny", (4, 3, 3, 8), -1),))
    # The tool keeps freed memory for the whole process: not for the test process.
    calls = []
    monkeypatch.setattr(distbn.memory, "retain_freed_memory", lambda: calls.append(1))
    out = tmp_path / "m.json"
    assert measure.main(["--threads", "1", "--rounds", "1", "--json", str(out)]) == 0
    assert calls == [1]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["layout", "thr", "copy", "GB/s"]
    assert lines[2].split()[:2] == ["tiny", "1"]
    saved = json.loads(out.read_text())
    assert saved["machine"]["malloc"] in ("retain", "default")
    assert [r["layout"] for r in saved["records"]] == ["tiny"]
