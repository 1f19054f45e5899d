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
    with pytest.raises(plot.PlotError, match=r"pip install matplotlib .*pip install -e "
                                             r"\"\.\[plot\]\""):
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


def test_partial_last_line_of_a_live_run_is_skipped_with_a_note(tmp_path, capsys):
    from distbn.cli import main

    write_metrics(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 10, "lo')  # the trainer is mid-write
    notes = []
    records = plot.read_metrics(tmp_path, notes)
    assert len(records) == 6 and len(notes) == 1 and "metrics.jsonl:7" in notes[0]
    if plot.have_matplotlib():
        assert main(["plot", str(tmp_path)]) == 0
        assert "note: " in capsys.readouterr().err and (tmp_path / "metrics.png").is_file()


def test_bad_line_with_its_newline_is_still_an_error(tmp_path):
    write_metrics(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "st\n')  # complete line, not JSON: corruption
    with pytest.raises(plot.PlotError, match="metrics.jsonl:7: not JSON"):
        plot.read_metrics(tmp_path, [])


def test_kernel_figure_has_no_torch_entry_without_torch_records():
    plt = pytest.importorskip("matplotlib.pyplot")
    params = {"shape": [4, 8], "dtype": "float32", "layout": "features", "threads": 1}

    def rec(name, metric, value):
        return {"name": name, "metric": metric, "value": value, "unit": "GB/s",
                "world_size": 1, "params": params, "spread": {}}

    records = [rec("kernel.copy", "bandwidth", 10.0), rec("kernel.forward", "bandwidth", 5.0)]
    fig = plot.kernel_figure(plt, records)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["distbn", "np.copyto (same array)"]
    records.append(rec("kernel.forward", "torch_bandwidth", 4.0))
    fig2 = plot.kernel_figure(plt, records)
    assert "torch" in [t.get_text() for t in fig2.axes[0].get_legend().get_texts()]
    plt.close(fig)
    plt.close(fig2)
