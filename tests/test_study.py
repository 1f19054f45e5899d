"""`distbn compare`: the study's measurements, its report and plot (and without matplotlib).

One tiny end-to-end run (2 ranks through mpiexec, plus the one-process reference) is
shared by the tests that read its output; the rest run in process.
"""

from __future__ import annotations

import io
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


# --------------------------------------------------------------------------------------
# Modes, seeds, aggregation (issue 19)

from distbn.bench import modes as study_modes  # noqa: E402


def test_parse_modes_labels_and_normalization_batch():
    got = study_modes.parse_modes("local, sync,sync:2,ghost:4,groupnorm,groupnorm:8,layernorm")
    assert [m.label for m in got] == ["replica-local", "synchronized", "sync:2", "ghost:4",
                                      "groupnorm", "groupnorm:8", "layernorm"]
    assert study_modes.parse_modes(["replica-local", "synchronized"]) == got[:2]
    nb = [study_modes.normalization_batch(m, 4, 16) for m in got]
    assert nb == [(4.0, "4"), (16.0, "16"), (8.0, "8"), (4.0, "4"), (None, "per-sample"),
                  (None, "per-sample"), (None, "per-sample")]
    # Uneven shards (7 over 3 ranks: 3, 2, 2): the sizes the groups really get.
    assert study_modes.normalization_batch(got[0], 3, 7) == (7 / 3, "2-3")
    study_modes.check_modes(got, 4, 16)  # all valid at 4 ranks x 4


@pytest.mark.parametrize("value, message", [
    ("local,foo", "unknown mode 'foo'"),
    ("ghost", "needs a size, ghost:S"),
    ("sync:1", "a sync group of 1 rank is replica-local"),
    ("sync:x", "needs a positive integer N (K ranks per sync group), got 'x'"),
    ("ghost:0", "got '0'"),
    ("layernorm:2", "unknown mode 'layernorm:2'"),
    ("local,,sync", "empty mode in 'local,,sync'"),
    ("sync,synchronized", "mode 'synchronized' is given twice"),
    ("layernorm+renorm", "+renorm needs a BatchNormalization mode"),
    ("local+ghost", "the only modifier is +renorm, got +'ghost'"),
    ("sync:x+renorm", "got 'x'"),
    (3, "expected comma-separated modes"),
])
def test_parse_modes_errors_quote_the_value(value, message):
    with pytest.raises(study_modes.StudyError, match="--modes: .*" + __import__("re").escape(
            message)):
        study_modes.parse_modes(value)


@pytest.mark.parametrize("mode, ranks, batch, message", [
    ("sync:3", 4, 16, "'sync:3': K=3 must divide the 4 ranks (valid: sync:2, sync:4)"),
    ("ghost:3", 2, 8, "'ghost:3': S=3 must divide the per-replica batch 4 (global batch 8 "
                      "over 2 ranks); valid: ghost:1, ghost:2, ghost:4"),
    ("ghost:2", 3, 8, "train.global_batch_size 8 does not divide over 3 ranks"),
])
def test_check_modes_errors(mode, ranks, batch, message):
    with pytest.raises(study_modes.StudyError) as err:
        study_modes.check_modes(study_modes.parse_modes(mode), ranks, batch)
    assert message in str(err.value)


def test_ghost_batches_need_full_batches():
    ghost = study_modes.parse_modes("ghost:32")
    study_modes.check_modes(ghost, 2, 128, last_batch=64)  # shards of 32
    with pytest.raises(study_modes.StudyError, match="each epoch ends with a batch of 32 "
                                                     "samples .* set train.drop_last=true"):
        study_modes.check_modes(ghost, 2, 128, last_batch=32)


def test_the_rethinking_bn_config_is_packaged_and_valid():
    from distbn.configs import packaged_config

    path = packaged_config("rethinking-bn")
    assert (ROOT_CONFIG.parent / "rethinking-bn.yaml").resolve() == path.resolve()
    _, section, _ = study.read_study_section(path)
    modes = study_modes.parse_modes(section["modes"])
    config = study.mode_config(path, mode=modes[0])
    gb, n = config.train.global_batch_size, config.data.n_train
    study_modes.check_modes(modes, 2, gb, last_batch=n % gb)
    assert [study_modes.normalization_batch(m, 2, gb)[1] for m in modes] == [
        "2", "8", "32", "64", "128"]


def test_mode_configs_replace_or_reconfigure_every_bn_layer(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(ROOT_CONFIG.read_text().replace(
        "- {type: BatchNormalization, momentum: 0.9}",
        "- {type: BatchNormalization, momentum: 0.9, epsilon: 0.01, synchronized: true}", 1))
    parse = study_modes.parse_modes
    ghost = study.mode_config(cfg, (), mode=parse("ghost:4")[0])
    bn = [s for s in ghost.model.layers if s.type == "BatchNormalization"]
    assert len(bn) == 3 and all(s.kwargs["virtual_batch_size"] == 4 for s in bn)
    assert bn[0].kwargs["synchronized"] is False and ghost.model.synchronized is False
    group = study.mode_config(cfg, (), mode=parse("sync:2")[0])
    assert group.strategy.sync_group == 2 and group.model.synchronized is True
    # groupnorm: at most G groups per layer, the largest that divides the channels.
    gn = study.mode_config(cfg, (), mode=parse("groupnorm")[0],
                           channels={1: 16, 5: 32, 10: 64})
    norms = [s for s in gn.model.layers if s.type == "GroupNormalization"]
    assert [s.kwargs["groups"] for s in norms] == [16, 32, 32]
    assert norms[0].kwargs == {"groups": 16, "epsilon": 0.01, "axis": -1}  # no momentum
    ln = study.mode_config(cfg, (), mode=parse("layernorm")[0])
    assert [s.type for s in ln.model.layers].count("LayerNormalization") == 3
    assert not any(s.type == "BatchNormalization" for s in ln.model.layers)


def test_renorm_modes_set_renorm_on_every_bn_layer_and_only_there(tmp_path):
    got = study_modes.parse_modes("local,local+renorm,sync:2+renorm,ghost:4+RENORM")
    assert [m.label for m in got] == ["replica-local", "replica-local+renorm",
                                      "sync:2+renorm", "ghost:4+renorm"]
    assert study_modes.normalization_batch(got[2], 4, 16) == (8.0, "8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(ROOT_CONFIG.read_text().replace(
        "- {type: BatchNormalization, momentum: 0.9}",
        "- {type: BatchNormalization, momentum: 0.9, renorm: true}", 1))
    for mode, want in ((got[0], False), (got[1], True), (got[3], True)):
        bn = [s for s in study.mode_config(cfg, (), mode=mode).model.layers
              if s.type == "BatchNormalization"]
        assert len(bn) == 3 and [s.kwargs.get("renorm", False) for s in bn] == [want] * 3
    ghost = [s for s in study.mode_config(cfg, (), mode=got[3]).model.layers
             if s.type == "BatchNormalization"]
    assert all(s.kwargs["virtual_batch_size"] == 4 for s in ghost)


def test_parse_seeds():
    assert study.parse_seeds("0,1,2", 7) == [0, 1, 2]
    assert study.parse_seeds("3", 5) == [5, 6, 7]  # a count from the config's seed
    assert study.parse_seeds(2, 0) == [0, 1] and study.parse_seeds([4, 9], 0) == [4, 9]
    for value, message in (("0", "a count of seeds must be >= 1"), ("1,x", "got 'x'"),
                           ("1,1", "a seed is given twice"), ("-1", "got '-1'")):
        with pytest.raises(study.StudyError, match=message):
            study.parse_seeds(value, 0)


def test_study_section_is_read_and_blanked(tmp_path):
    cfg = tmp_path / "s.yaml"
    text = ROOT_CONFIG.read_text()
    cfg.write_text("study:\n  modes: [local, ghost:2]\n  seeds: 2\n" + text)
    rest, values, where = study.read_study_section(cfg)
    assert values == {"modes": ["local", "ghost:2"], "seeds": 2}
    assert where == {"modes": f"{cfg}:2", "seeds": f"{cfg}:3"}
    assert rest.splitlines()[3:] == text.splitlines()  # line numbers kept
    assert study.mode_config(cfg).train.global_batch_size == 128
    cfg.write_text("study:\n  modez: local\n" + text)
    with pytest.raises(study.StudyError, match=r"s.yaml:2: unknown key 'study.modez'"):
        study.read_study_section(cfg)


def test_mode_and_seed_usage_errors_before_any_training(tmp_path, capsys):
    from distbn.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text("study:\n  modes: local,bogus\n" + ROOT_CONFIG.read_text())
    cases = [([str(ROOT_CONFIG), "--modes", "local,foo"], "--modes: unknown mode 'foo'"),
             ([str(ROOT_CONFIG), "--modes", "sync:3"], "K=3 must divide the 2 ranks"),
             ([str(ROOT_CONFIG), "--modes", "ghost:5"], "S=5 must divide the per-replica "
                                                        "batch 64"),
             ([str(ROOT_CONFIG), "--seeds", "0,0"], "--seeds: a seed is given twice"),
             ([str(ROOT_CONFIG), "--precise-bn-samples", "-1"], "got -1"),
             ([str(ROOT_CONFIG), "--set", "train.precise_bn.batches=2"],
              "train.precise_bn.batches: distbn compare evaluates"),
             ([str(cfg)], f"{cfg}:2: study.modes: unknown mode 'bogus'")]
    for argv, message in cases:
        assert main(["compare", *argv, "--out", str(tmp_path / "o"),
                     "--set", "data.n_train=256", "--set", "data.n_test=8"]) == 2
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "o").exists()


def _summary(mode, seed, test_acc, train_acc, ptest, ptrain, norm=4.0, text="4"):
    return {"type": "summary", "mode": mode, "seed": seed, "ranks": 2, "global_batch_size": 8,
            "steps": 10, "every": 1, "norm_batch": norm, "norm_batch_text": text,
            "train_loss": 1.0, "train_accuracy": 0.5, "train_eval_accuracy": train_acc,
            "test_loss": 1.0, "test_accuracy": test_acc, "precise_test_accuracy": ptest,
            "precise_train_eval_accuracy": ptrain, "mean_dev": 0.1, "var_ratio": 0.9,
            "moving_mean_spread": 0.0, "train_seconds": 1.0, "layers": {}}


def test_seeds_are_aggregated_as_mean_and_sample_std():
    assert study_report.mean_std([0.7, 0.8, 0.9]) == pytest.approx((0.8, 0.1, 3))
    assert study_report.mean_std([0.5, None]) == (0.5, None, 1)
    assert study_report.significant((0.5, 0.1, 3), (0.75, 0.1, 3)) is True   # 0.25 > 0.2
    assert study_report.significant((0.5, 0.1, 3), (0.65, 0.1, 3)) is False  # 0.15 < 0.2
    assert study_report.significant((0.5, None, 1), (0.9, 0.1, 3)) is None
    recs = [{"type": "meta", "modes": ["ghost:2", "replica-local"], "seeds": [0, 1, 2],
             "precise_bn_samples": 64}]
    # replica-local: test errors 0.3, 0.2, 0.1 (mean 0.2, std 0.1), train errors 0.1, 0.1,
    # 0.1: gaps 0.2, 0.1, 0 (mean 0.1, std 0.1); PreciseBN test errors 0.25, 0.15, 0.05.
    for seed, (t, p) in enumerate([(0.7, 0.75), (0.8, 0.85), (0.9, 0.95)]):
        recs.append(_summary("replica-local", seed, t, 0.9, p, 0.9))
        recs.append(_summary("ghost:2", seed, 0.4, 0.5, 0.3, 0.5, norm=2.0, text="2"))
    rows = {r["mode"]: r for r in study_report.batch_rows(recs)}
    assert [r["mode"] for r in study_report.batch_rows(recs)] == ["ghost:2", "replica-local"]
    local = rows["replica-local"]
    assert local["test_ema"] == pytest.approx((0.2, 0.1, 3))
    assert local["gap_ema"] == pytest.approx((0.1, 0.1, 3))
    assert local["test_precise"] == pytest.approx((0.15, 0.1, 3))
    assert local["precise_minus_ema"][0] == pytest.approx(-0.05)
    assert rows["ghost:2"]["test_ema"] == pytest.approx((0.6, 0.0, 3))
    # Train-test inconsistency: train err (inference) - train err (training mode, 0.5).
    # ghost:2: EMA 0.5 - 0.5 = 0, PreciseBN 0.5 - 0.5 = 0; replica-local: 0.1 - 0.5 both.
    assert rows["ghost:2"]["incons_ema"] == pytest.approx((0.0, 0.0, 3))
    assert local["incons_precise"] == pytest.approx((-0.4, 0.0, 3))
    table = study_report.render_batch_table(recs).splitlines()
    assert table[3].startswith("| replica-local | 4 | 3 | 20.00 ± 10.00 | 15.00 ± 10.00 | "
                               "-5.00 ± 0.00 | 10.00 ± 0.00 | 10.00 ± 10.00 |"), table[3]
    md = study_report.render_markdown(recs, plot=False)
    assert "|mean_a - mean_b| > std_a + std_b" in md
    # ghost:2 vs replica-local, EMA: 0.6 - 0.2 = 0.4 > 0 + 0.1: significant.
    assert ("Test error (EMA) is lowest at normalization batch 4 (replica-local, "
            "20.00 ± 10.00%)") in md
    assert "the smallest BN batch (2, ghost:2) is +40.00 points (significant)" in md
    assert "| replica-local | 2 x 4 | 1.0000 ± 0.0000 |" in md  # per-mode table, over seeds
    assert table[3].endswith("| -40.00 ± 0.00 | -40.00 ± 0.00 |"), table[3]
    assert "the EMA has no train-test inconsistency to close" in md
    # A lagging EMA: inference train error 0.3 over training mode's 0.1 (inconsistency
    # 0.2); PreciseBN's 0.15 leaves 0.05: it closes 75% of it.
    lag = [{"type": "meta", "modes": ["replica-local"], "seeds": [0, 1]}]
    for seed in (0, 1):
        rec = _summary("replica-local", seed, 0.6, 0.7, 0.8, 0.85)
        lag.append({**rec, "train_accuracy": 0.9})
    assert ("it closes 75% of the EMA train-test inconsistency (20.00 ± 0.00 -> "
            "5.00 ± 0.00 points, significant)") in study_report.render_markdown(lag, plot=False)


# --------------------------------------------------------------------------------------
# sync:K at N ranks == one process with the same normalization groups; the report of a
# multi-mode, multi-seed study. One 4-rank launch (sync:2 needs 4 ranks to be neither
# replica-local nor whole-world).

EXACT = ["--set", "model.dtype=float64", "--set", "data.n_train=96", "--set", "data.n_test=16",
         "--set", "train.global_batch_size=16", "--set", "train.steps=6",
         "--set", "train.eval_every=0", "--every", "1", "--precise-bn-samples", "96"]


@pytest.fixture(scope="module")
def four_rank_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study4")
    res = distbn(["compare", "configs/quickstart.yaml", "--out", out, "--ranks", "4",
                  "--modes", "local,sync:2,sync,ghost:2,groupnorm", "--seeds", "0,1", *EXACT],
                 timeout=150)
    assert res.returncode == 0, res.report()
    return out, res, study_report.read_records(out / study.RECORDS_FILE)


def _grouped_dataset(dataset, batch, group, steps):
    """The training split relabelled so that one process's ghost batches of `group`
    samples hold exactly the contiguous groups of each global batch: ghost batch j is
    batch positions j, j + G, j + 2G, ... (G = batch / group), so position j + G*i gets
    the sample at position j*group + i. Valid within the first epoch."""
    from distbn.train import builder
    from distbn.train.data import BatchSchedule

    n = len(dataset.y_train)
    ghosts = batch // group
    schedule = BatchSchedule(n, batch, 0)
    assert steps <= schedule.steps_per_epoch
    source = np.arange(n)
    for step in range(schedule.steps_per_epoch):
        idx = schedule.batch_at(step)[2]
        q = np.arange(batch)
        source[idx[q]] = idx[(q % ghosts) * group + q // ghosts]
    return builder.Dataset(dataset.x_train[source], dataset.y_train[source], dataset.x_test,
                           dataset.y_test, dataset.num_classes)


def test_sync_groups_at_four_ranks_equal_one_process_with_the_same_groups(four_rank_study):
    from distbn.distribute import LocalStrategy
    from distbn.train import builder

    _, _, records = four_rank_study
    parse = study_modes.parse_modes
    # sync:2 at 4 ranks x 4 normalises contiguous groups of 8 samples; one process with
    # ghost batches of 8 on the relabelled data normalises the same groups. Its moving
    # statistics average the groups' statistics, as the 4 replicas' averaged ones do.
    overrides = [v for flag, v in zip(EXACT, EXACT[1:], strict=False) if flag == "--set"]
    ghost = parse("ghost:8")[0]
    config = study.mode_config(ROOT_CONFIG, overrides, mode=ghost)
    data = _grouped_dataset(builder.load_dataset(config), 16, 8, 6)
    emitted = []
    want = study.train_mode(config, "one-process", LocalStrategy(), dataset=data, every=1,
                            emit=emitted.append, norm_mode=ghost, precise_bn_samples=96,
                            err=io.StringIO())
    got = next(r for r in records if r["type"] == "summary" and r["mode"] == "sync:2"
               and r["seed"] == 0)
    steps = [r["loss"] for r in _steps(records, "sync:2") if r["seed"] == 0]
    ref = [r["loss"] for r in emitted if r["type"] == "step"]
    assert len(steps) == 6 and steps == pytest.approx(ref, rel=1e-10)
    for key in ("test_loss", "train_eval_loss", "precise_test_loss", "precise_train_eval_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key
    assert got["test_accuracy"] == want["test_accuracy"]
    assert got["norm_batch"] == want["norm_batch"] == 8.0
    # Replica-local at 4 ranks differs from both (groups of 4), so the check has teeth.
    local = next(r for r in records if r["type"] == "summary" and r["mode"] == "replica-local"
                 and r["seed"] == 0)
    assert abs(local["test_loss"] - got["test_loss"]) > 1e-6


def test_multi_mode_multi_seed_report(four_rank_study):
    out, res, records = four_rank_study
    meta = records[0]
    assert meta["modes"] == ["replica-local", "sync:2", "synchronized", "ghost:2", "groupnorm"]
    assert meta["seeds"] == [0, 1] and meta["ranks"] == 4
    sums = [r for r in records if r["type"] == "summary"]
    assert sorted((r["mode"], r["seed"]) for r in sums) == sorted(
        (m, s) for m in meta["modes"] for s in (0, 1))
    by = {(r["mode"], r["seed"]): r for r in sums}
    assert [by[(m, 0)]["norm_batch_text"] for m in meta["modes"]] == [
        "4", "8", "16", "2", "per-sample"]
    for (mode, _), r in by.items():
        bn = mode != "groupnorm"
        assert (r["precise_test_accuracy"] is not None) == bn, mode
        assert (r["precise_samples"] == 96) if bn else r["precise_samples"] is None
    # Moving statistics: one set over the whole world, two over sync groups of 2.
    assert by[("synchronized", 0)]["moving_mean_spread"] == 0.0
    assert by[("sync:2", 0)]["moving_mean_spread"] > 1e-6
    report = (out / "report.md").read_text()
    assert "## Test error against normalization batch size" in report
    rows = [line for line in report.splitlines() if line.startswith("| ghost:2 | 2 | 2 |")]
    assert len(rows) == 1 and rows[0].count(" ± ") >= 8, rows  # mean ± std over 2 seeds
    order = [line.split(" | ")[0][2:] for line in report.splitlines()
             if line.startswith("| ") and " | 2 | " in line and "per-sample" not in line
             and line.split(" | ")[1].isdigit()]
    assert order[:4] == ["ghost:2", "replica-local", "sync:2", "synchronized"], order
    assert "| groupnorm | per-sample | 2 |" in report
    assert "Significance rule" in report and "error-vs-batch.png" in report
    assert (out / "error-vs-batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[10/10 seed 1]: groupnorm: done" in res.stderr  # progress per run
