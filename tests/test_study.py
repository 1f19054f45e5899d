"""`distbn compare`: the study's measurements, its report and plot (and without matplotlib).

One tiny end-to-end run (2 ranks through mpiexec, plus the one-process reference) is
shared by the tests that read its output; the rest run in process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import distbn

from distbn.bench import study, study_report
from distbn.ops.batch_norm import local_mean_m2

ROOT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
TINY = ["--set", "data.n_train=48", "--set", "data.n_test=16",
        "--set", "train.global_batch_size=8", "--set", "train.steps=5",
        "--set", "train.eval_every=2", "--every", "1"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    res = distbn(["compare", "configs/quickstart.yaml", "--out", out, "--reference", *TINY],
                 timeout=150)
    assert res.returncode == 0, res.report()
    return out, res, study_report.read_records(out / study.RECORDS_FILE)


def _steps(records, mode):
    return [r for r in records if r.get("mode") == mode and r["type"] == "step"]


def test_compare_writes_report_plot_and_records(tiny_study):
    out, res, records = tiny_study
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| replica-local | 2 x 4 |") for line in table), report
    assert any(line.startswith("| synchronized | 2 x 4 |") for line in table), report
    assert any(line.startswith("| reference | 1 x 8 |") for line in table), report
    assert "| replica-local |" in res.stdout  # the table is printed too
    data = (out / "report.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000  # matplotlib's figure
    assert records[0]["type"] == "meta" and records[0]["ranks"] == 2
    for mode in study.MODES + (study.REFERENCE,):
        steps = _steps(records, mode)
        assert [r["step"] for r in steps] == [1, 2, 3, 4, 5], mode
        assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in steps)
        assert [r["step"] for r in records if r.get("mode") == mode and r["type"] == "eval"] \
            == [2, 4, 5]
        assert sum(r["type"] == "summary" for r in records if r.get("mode") == mode) == 1


def test_moving_statistics_spread_is_zero_only_when_synchronized(tiny_study):
    _, _, records = tiny_study
    sync, local = _steps(records, "synchronized"), _steps(records, "replica-local")
    for r in sync:
        for name, m in r["layers"].items():
            assert m["moving_mean_spread"] == 0.0 and m["moving_var_spread"] == 0.0, (name, r)
    for r in local:
        for name, m in r["layers"].items():
            assert m["moving_mean_spread"] > 1e-6 and m["moving_var_spread"] > 1e-6, (name, r)
    # Per-rank batch statistics differ from the global ones in both modes: the data's
    # doing, whatever BN normalises with.
    for r in sync + local:
        assert r["mean_dev"] > 1e-3 and r["var_dev"] > 1e-3
        assert len(r["layers"]) == 3


def test_same_seed_and_batches_in_every_mode(tiny_study):
    _, _, records = tiny_study
    sync, ref = _steps(records, "synchronized"), _steps(records, "reference")
    local = _steps(records, "replica-local")
    # Step 1's loss is the initial model on the first global batch: synchronized N ranks
    # and one process agree to float32 rounding; replica-local normalises differently.
    assert sync[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-5)
    assert abs(local[0]["loss"] - sync[0]["loss"]) > 1e-4
    assert [r["samples"] for r in sync] == [r["samples"] for r in ref] == [8] * 5


def _shards(rng, sizes, channels=3):
    return [rng.normal(loc=rng.normal(), scale=1 + rng.random(), size=(n, 4, channels))
            for n in sizes]


def test_layer_divergence_against_the_concatenated_batch():
    rng = np.random.default_rng(1)
    shards = _shards(rng, [5, 2, 0, 7])  # uneven, and one empty rank
    eps = 1e-3
    stats = [local_mean_m2(x, (0, 1)) for x in shards]
    counts, means, m2s = (np.stack([s[k] for s in stats]) for k in range(3))
    mm = rng.normal(size=(4, 3))
    mv = 1 + rng.random((4, 3))
    got = study.layer_divergence(counts, means, m2s, mm, mv, eps)
    whole = np.concatenate(shards)
    mu, var = whole.mean(axis=(0, 1)), whole.var(axis=(0, 1))
    devs = [np.mean(np.abs(x.mean(axis=(0, 1)) - mu) / np.sqrt(var + eps)) for x in shards
            if len(x)]
    ratios = np.array([(x.var(axis=(0, 1)) + eps) / (var + eps) for x in shards if len(x)])
    assert got["mean_dev"] == pytest.approx(max(devs), rel=1e-12)
    assert got["var_ratio"] == pytest.approx(ratios.mean(), rel=1e-12)
    assert got["var_dev"] == pytest.approx(np.abs(np.log(ratios)).mean(axis=1).max(),
                                           rel=1e-12)
    spread = (mm.std(axis=0) / np.sqrt(mv.mean(axis=0))).max()
    assert got["moving_mean_spread"] == pytest.approx(spread, rel=1e-12)
    assert got["moving_var_spread"] == pytest.approx((mv.std(axis=0) / mv.mean(axis=0)).max(),
                                                     rel=1e-12)


def test_layer_divergence_identical_replicas_give_exactly_zero_spread():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 5))
    count, mean, m2 = local_mean_m2(x, (0,))
    mm = np.tile(rng.normal(size=5) * 1e3 + 0.1, (3, 1))  # values whose mean rounds
    mv = np.tile(rng.random(5) + 0.3, (3, 1))
    got = study.layer_divergence(np.tile(count, (3, 1)), np.tile(mean, (3, 1)),
                                 np.tile(m2, (3, 1)), mm, mv, 1e-3)
    assert got["moving_mean_spread"] == 0.0 and got["moving_var_spread"] == 0.0
    assert got["mean_dev"] == pytest.approx(0.0, abs=1e-12)
    assert got["var_dev"] == pytest.approx(0.0, abs=1e-12)
    assert got["var_ratio"] == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match=r"shapes"):
        study.layer_divergence(count[None], mean[None], m2[None], mm, mv, 1e-3)


def test_mode_config_forces_every_bn_layer(tmp_path):
    text = (ROOT_CONFIG.read_text()
            .replace("- {type: BatchNormalization, momentum: 0.9}",
                     "- {type: BatchNormalization, momentum: 0.9, synchronized: true}", 1))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    local = study.mode_config(cfg, ["train.steps=3"], synchronized=False)
    bn = [s for s in local.model.layers if s.type == "BatchNormalization"]
    assert local.model.synchronized is False and local.train.steps == 3
    assert bn[0].kwargs["synchronized"] is False and len(bn) == 3
    sync = study.mode_config(cfg, (), synchronized=True)
    assert sync.model.synchronized is True


def test_usage_errors_quote_the_value(tmp_path, capsys):
    from distbn.cli import main

    cases = [(["--ranks", "1"], "got 1"),
             (["--set", "strategy.sync_group=2"], "must be null, got 2"),
             (["--set", "train.global_batch_size=1"], "(1) is smaller than --ranks (2)"),
             (["--every", "0"], "--every must be >= 1, got 0")]
    for extra, message in cases:
        assert main(["compare", str(ROOT_CONFIG), "--out", str(tmp_path / "o"), *extra]) == 2
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists()  # nothing written for a usage error


def _records_for_plot():
    recs = [{"type": "meta", "command": "distbn compare x", "ranks": 2}]
    for i, mode in enumerate(("replica-local", "synchronized")):
        for step in range(1, 41):
            recs.append({"type": "step", "mode": mode, "step": step, "loss": 2 - step / 30 + i,
                         "accuracy": step / 50, "samples": 8, "mean_dev": 0.1 + 0.01 * i,
                         "var_ratio": 0.95, "var_dev": 0.2,
                         "moving_mean_spread": 0.0 if i else 0.05, "moving_var_spread": 0.0,
                         "layers": {}})
        recs.append({"type": "eval", "mode": mode, "step": 40, "split": "test", "loss": 1.0,
                     "accuracy": 0.5, "samples": 16})
    return recs


def test_without_matplotlib_the_report_says_how_to_get_the_plot(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    recs = _records_for_plot()
    assert study_report.write_plot(recs, tmp_path / "p.png") is None
    paths = study_report.write_report(recs, tmp_path)
    assert [p.name for p in paths] == ["report.md"] and not list(tmp_path.glob("*.png"))
    report = paths[0].read_text()
    assert "report.png" not in report and "pip install matplotlib" in report


def test_plot_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    path = study_report.write_plot(_records_for_plot(), tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_markdown_without_reference_has_two_rows():
    recs = json.loads(json.dumps(_records_for_plot()))
    for mode in ("replica-local", "synchronized"):
        recs.append({"type": "summary", "mode": mode, "ranks": 2, "global_batch_size": 8,
                     "per_replica_batch": 4.0, "steps": 40, "every": 1, "train_loss": 1.0,
                     "train_accuracy": 0.5, "train_eval_accuracy": 0.5, "test_loss": 1.0,
                     "test_accuracy": 0.5, "mean_dev": 0.1, "var_ratio": 0.9,
                     "moving_mean_spread": 0.0, "train_seconds": 1.0, "layers": {}})
    table = study_report.render_table(recs).splitlines()
    assert len(table) == 4 and table[2].startswith("| replica-local |")
    assert "report.png" in study_report.render_markdown(recs)


def test_report_prints_the_real_per_replica_batch_sizes():
    # 64 samples on 3 ranks: shards of 22, 21 and 21, not "21.3333".
    assert study_report.per_replica_batch(64, 3) == "21-22"
    assert study_report.per_replica_batch(8, 2) == "4"
    recs = [{"type": "summary", "mode": "synchronized", "ranks": 3, "global_batch_size": 64,
             "per_replica_batch": 64 / 3, "steps": 4, "every": 1, "train_loss": 1.0,
             "train_accuracy": 0.5, "train_eval_accuracy": 0.5, "test_loss": 1.0,
             "test_accuracy": 0.5, "mean_dev": 0.1, "var_ratio": 0.9,
             "moving_mean_spread": 0.0, "train_seconds": 1.0, "layers": {}}]
    row = study_report.render_table(recs).splitlines()[2]
    assert "| 3 x 21-22 |" in row and "21.3" not in row
