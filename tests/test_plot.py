"""`distbn plot`: a PNG from metrics.jsonl with matplotlib, a clear error without it."""

import builtins
import json

import pytest

from distbn import plot


def write_metrics(run_dir):
    lines = [{"split": "train", "step": s, "loss": 2.0 / (s + 1), "accuracy": s / 10}
             for s in range(0, 10, 2)]
    lines.append({"split": "test", "step": 9, "loss": 0.5, "accuracy": 0.8})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(plot.PlotError, match=r"pip install 'distbn\[plot\]'"):
        plot.plot_run(tmp_path)


def test_missing_metrics_names_the_file(tmp_path):
    with pytest.raises(plot.PlotError, match="metrics.jsonl does not exist"):
        plot.plot_run(tmp_path)


def test_bad_line_is_quoted(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(plot.PlotError, match=r"metrics.jsonl:2: not JSON"):
        plot.read_metrics(tmp_path)


def test_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path)
    out = plot.plot_run(tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
