"""`distbn bench`: suites on tiny sizes, the results schema, the launcher, report merging.

Only the plumbing is checked (records, world sizes, files, errors); timings are never
asserted.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mpi_driver import REPO, run_mpi

from distbn.bench import Context, kernel, parse_ranks, parse_suites, write_report
from distbn.bench.environment import kernel_backend
from distbn.bench.results import (
    make_record,
    merge_results,
    read_results,
    validate_record,
    write_results,
)
from distbn.bench.scaling import derive_efficiency
from distbn.bench.timing import Stats
from distbn.cli import main
from distbn.launcher import run_group

PASSES = ("forward", "backward", "forward_backward")


def _run(argv, timeout):
    """`python -m distbn ...` in its own process group, stopped whole on timeout."""
    res = run_group([sys.executable, "-m", "distbn", *argv], cwd=REPO, timeout=timeout,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if res.timed_out:
        pytest.fail(f"distbn {' '.join(argv)} timed out; stderr:\n{res.stderr[-4000:]}")
    return res.returncode, res.stdout, res.stderr


def _by(records, name=None, metric=None, world_size=None):
    return [r for r in records if (name is None or r["name"] == name)
            and (metric is None or r["metric"] == metric)
            and (world_size is None or r["world_size"] == world_size)]


# --- kernel suite in-process -------------------------------------------------------------------

def test_kernel_suite_without_torch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    records = kernel.run(Context("tiny"))
    assert "torch is not importable; skipping" in capsys.readouterr().err
    for rec in records:
        validate_record(rec)
    n_cases = len(kernel.cases("tiny"))
    # The copy the ratios use: one per case, of an array of the case's input size.
    copy = _by(records, "kernel.copy", "bandwidth")
    assert len(copy) == n_cases and all(r["value"] > 0 and r["unit"] == "GB/s" for r in copy)
    for rec in copy:
        nbytes = np.prod(rec["params"]["shape"]) * np.dtype(rec["params"]["dtype"]).itemsize
        assert rec["params"]["bytes"] == 2 * nbytes
        assert rec["spread"]["repeats"] == _by(records, "kernel.forward", "time")[0][
            "spread"]["repeats"]  # timed in the same rounds as the passes
    assert not [r for r in records if r["metric"].startswith("torch")]
    for name in ("kernel.stats", "kernel.normalize"):  # the forward's two passes alone
        assert len(_by(records, name, "time")) == n_cases
    two = _by(records, "kernel.forward", "two_pass_copy_fraction")
    assert len(two) == n_cases and all(r["value"] > 0 for r in two)
    for pas in PASSES:
        times = _by(records, f"kernel.{pas}", "time")
        assert len(times) == n_cases
        for rec in times:
            assert rec["value"] > 0 and rec["unit"] == "us" and rec["world_size"] == 1
            assert rec["spread"]["repeats"] >= 3 and rec["spread"]["min"] <= rec["value"]
            assert rec["spread"]["max"] >= rec["value"]
            assert rec["params"]["backend"] == kernel_backend() and rec["params"]["threads"] >= 1
            factor = {"forward": 2, "backward": 3, "forward_backward": 5}[pas]
            nbytes = np.prod(rec["params"]["shape"]) * np.dtype(rec["params"]["dtype"]).itemsize
            assert rec["params"]["bytes"] == factor * nbytes
    # The layer's variants against the plain forward+backward of the same rounds: renorm
    # in every case, ghost batches (a quarter of the batch) where four divide it.
    plain = {tuple(r["params"]["shape"]): r for r in _by(records, "kernel.forward_backward",
                                                          "time")}
    for name, params in (("kernel.renorm", {"renorm": True}), ("kernel.ghost", None)):
        ratios = _by(records, name, "plain_ratio")
        shapes = [tuple(c["shape"]) for c in kernel.cases("tiny")
                  if name == "kernel.renorm" or c["shape"][0] % 4 == 0]
        assert sorted(tuple(r["params"]["shape"]) for r in ratios) == sorted(shapes)
        for rec in ratios:
            assert rec["value"] > 0 and rec["unit"] == "ratio"
            want = params or {"virtual_batch_size": rec["params"]["shape"][0] // 4}
            assert {k: rec["params"][k] for k in want} == want
            assert rec["spread"]["repeats"] == plain[tuple(rec["params"]["shape"])][
                "spread"]["repeats"]
        assert len(_by(records, f"kernel.{pas}", "copy_fraction")) == n_cases
    layouts = {r["params"]["layout"] for r in _by(records, "kernel.forward", "time")}
    assert {"channels_last", "channels_first"} <= layouts
    assert len(_by(records, "kernel.forward_backward", "peak_extra_memory")) == n_cases


def test_kernel_suite_with_torch():
    pytest.importorskip("torch")
    records = kernel.run(Context("tiny"))
    n_cases = len(kernel.cases("tiny"))
    for pas in PASSES:
        for metric in ("torch_time", "torch_bandwidth", "torch_ratio"):
            recs = _by(records, f"kernel.{pas}", metric)
            assert len(recs) == n_cases and all(r["value"] > 0 for r in recs)


def test_kernel_cases_include_the_issue_shapes():
    cases = kernel.cases("full")
    assert {"shape": (64, 32, 32, 64), "dtype": "float32", "layout": "channels_last",
            "axis": -1} in cases
    assert {"shape": (64, 64, 32, 32), "dtype": "float32", "layout": "channels_first",
            "axis": 1} in cases
    assert {c["dtype"] for c in cases} == {"float32", "float64"}


# --- schema, statistics, parsing ---------------------------------------------------------------

def test_record_schema_and_validation(tmp_path):
    rec = make_record("x.y", "time", Stats([3.0, 1.0, 2.0]), "us", 2, {"shape": (2, 3)}, 1)
    assert rec["value"] == 2.0 and rec["params"]["shape"] == [2, 3]
    assert rec["spread"]["min"] == 1.0 and rec["spread"]["max"] == 3.0
    assert rec["spread"]["repeats"] == 3 and rec["spread"]["warmup"] == 1
    validate_record(rec)
    for key, bad in (("world_size", 0), ("value", "fast"), ("spread", {"min": 1})):
        with pytest.raises(ValueError, match=key if key != "value" else "number"):
            validate_record(dict(rec, **{key: bad}))
    with pytest.raises(ValueError, match="lacks"):
        validate_record({k: v for k, v in rec.items() if k != "unit"})
    write_results(tmp_path, {"cpu_model": "x"}, [rec])
    assert read_results(tmp_path)["records"] == [rec]
    (tmp_path / "results.json").write_text(json.dumps({"environment": {}, "records": [{}]}))
    with pytest.raises(ValueError, match="results.json"):
        read_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_results(tmp_path / "nowhere")


def test_parse_ranks_and_suites():
    assert parse_ranks("4,1,2,2") == [1, 2, 4]
    for bad in ("1,x", "0", "", "1,-2"):
        with pytest.raises(ValueError, match=repr(bad).replace("\\", "\\\\")):
            parse_ranks(bad)
    assert parse_suites([]) == ["kernel", "allreduce", "sync", "scaling", "torch", "step"]
    assert parse_suites(["keras", "kernel"]) == ["kernel", "keras"]
    assert parse_suites(["sync", "kernel"]) == ["kernel", "sync"]
    with pytest.raises(ValueError, match="'kernal'.*did you mean 'kernel'"):
        parse_suites(["kernal"])


def test_cli_rejects_bad_suite_and_ranks(capsys):
    assert main(["bench", "--tiny", "allreduc"]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'allreduc'" in err and "did you mean 'allreduce'" in err
    assert main(["bench", "--tiny", "--ranks", "1,two"]) == 2
    assert "'1,two'" in capsys.readouterr().err
    assert main(["bench", "report"]) == 2
    assert "at least one result directory" in capsys.readouterr().err
    assert main(["bench", "report", "somewhere", "--quick"]) == 2
    assert "--quick" in capsys.readouterr().err
    assert main(["bench", "--tiny", "--mpiexec", "/no/such/mpiexec", "--out", "unused"]) == 2
    assert "'/no/such/mpiexec' not found" in capsys.readouterr().err


def test_derive_efficiency_across_sources():
    def thr(ws, value, source):
        rec = make_record("scaling.step", "throughput", Stats([value * 0.9, value, value * 1.1]),
                          "samples/s", ws, {"per_rank_batch": 4, "global_batch": 4 * ws})
        return dict(rec, source=source)

    records = [thr(1, 100.0, "a"), thr(4, 300.0, "b")]
    one, eff = sorted(derive_efficiency(records), key=lambda r: r["world_size"])
    assert one["world_size"] == 1 and one["value"] == pytest.approx(1.0)
    assert eff["metric"] == "efficiency" and eff["world_size"] == 4
    assert eff["value"] == pytest.approx(0.75) and eff["source"] == "b"
    assert eff["spread"]["min"] == pytest.approx(0.675)
    assert derive_efficiency(records + [one, eff]) == []  # not duplicated


def test_merge_results_keeps_common_environment():
    a = {"environment": {"numpy": "2", "date": "d1", "hosts": ["h1"]}, "records": []}
    b = {"environment": {"numpy": "2", "date": "d2", "hosts": ["h2"]}, "records": []}
    env = merge_results([("a", a), ("b", b)])["environment"]
    assert env["numpy"] == "2" and env["hosts"] == ["h1", "h2"] and "date" not in env
    assert [(r["source"], r["date"]) for r in env["runs"]] == [("a", "d1"), ("b", "d2")]


# --- whole runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`distbn bench --tiny --ranks 1,2` (the --quick path with minimal sizes)."""
    out = tmp_path_factory.mktemp("bench") / "run"
    code, stdout, stderr = _run(["bench", "--tiny", "--ranks", "1,2", "--timeout", "90",
                                 "--out", str(out)], timeout=200)
    assert code == 0, stderr[-4000:]
    return out, stdout, stderr


def test_tiny_run_writes_results_at_world_sizes_1_and_2(tiny_run):
    out, stdout, stderr = tiny_run
    results = json.loads((out / "results.json").read_text())
    env, records = results["environment"], results["records"]
    for rec in records:
        validate_record(rec)
    assert {r["world_size"] for r in records} == {1, 2}
    for ws in (1, 2):
        assert _by(records, "allreduce.bn_forward", "latency", ws)
        assert _by(records, "allreduce.bn_backward", "latency", ws)
        assert _by(records, "allreduce.bucket", "latency", ws)
        for pas in ("forward", "backward", "step"):
            assert _by(records, f"sync.{pas}", "overhead", ws)
            assert _by(records, f"sync.{pas}", "sync_time", ws)
        assert _by(records, "scaling.step", "throughput", ws)
    assert _by(records, "allreduce.bucket", "bandwidth", 2)
    assert _by(records, "sync.step", "overhead_allreduces", 2)
    assert _by(records, "scaling.step", "efficiency", 2)
    assert _by(records, "kernel.forward", "time", 1) and _by(records, "kernel.backward", "time", 1)
    assert not [r for r in records if r["name"].startswith("kernel.") and r["world_size"] != 1]
    # The step suite is one-process work: measured once, in the first world size's job.
    assert _by(records, "step.train_step", "time", 1)
    assert not [r for r in records if r["name"].startswith("step.") and r["world_size"] != 1]
    for key in ("hosts", "mpi_library", "numpy", "blas", "cpu_model", "distbn", "threads",
                "command"):
        assert key in env, key
    assert "git_revision" in env or all("git_revision" in r for r in env["runs"])
    assert env["command"].startswith("distbn bench --tiny")
    assert sorted(r["world_size"] for r in env["runs"]) == [1, 2]
    report = (out / "report.md").read_text()
    for section in ("## Environment", "## Kernels", "## Allreduce", "## Scaling",
                    "## Synchronized vs replica-local", "## Training step vs PyTorch"):
        assert section in report
    assert "[bench n=2" in stderr  # a progress line per measurement


def test_report_merges_two_dirs(tiny_run, tmp_path):
    out, _, _ = tiny_run
    other = tmp_path / "job4"
    rec = make_record("scaling.step", "throughput", Stats([50.0, 60.0, 70.0]), "samples/s", 4,
                      {"config": "quickstart.yaml", "per_rank_batch": 4, "global_batch": 16,
                       "dtype": "float32", "synchronized": True})
    write_results(other, {"hosts": ["node7"], "world_size": 4}, [rec])
    merged_dir = tmp_path / "merged"
    assert main(["bench", "report", str(out), str(other), "--out", str(merged_dir)]) == 0
    merged = read_results(merged_dir)
    assert {r["source"] for r in merged["records"]} == {str(out), str(other)}
    assert len(_by(merged["records"], "scaling.step", "efficiency", 4)) == 1
    assert "node7" in merged["environment"]["hosts"]
    report = (merged_dir / "report.md").read_text()
    assert "| source |" in report and str(other) in report


def test_report_without_matplotlib_skips_plots(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out, _, _ = tiny_run
    paths = write_report(read_results(out), tmp_path)
    assert paths == [tmp_path / "report.md"]
    assert "## Plots" not in paths[0].read_text() and not list(tmp_path.glob("*.png"))


def test_report_with_matplotlib_writes_plots(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, _, _ = tiny_run
    paths = write_report(read_results(out), tmp_path)
    assert {p.name for p in paths} >= {"report.md", "allreduce.png", "scaling.png", "kernel.png"}
    assert "![scaling](scaling.png)" in (tmp_path / "report.md").read_text()


def test_under_mpiexec_measures_at_its_world_size(tmp_path):
    out = tmp_path / "here"
    run = run_mpi(2, ["-m", "distbn", "bench", "--tiny", "--out", str(out), "allreduce"],
                  timeout=90)
    assert run.returncode == 0 and not run.timed_out, run.failure_report()
    results = read_results(out)
    assert {r["world_size"] for r in results["records"]} == {2}
    assert results["environment"]["world_size"] == 2
    assert (out / "report.md").is_file()


def test_sbatch_script_parses():
    script = Path(REPO) / "launch" / "bench.sbatch"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "srun --mpi=pmix --kill-on-bad-exit=1" in text
    assert "#SBATCH --cpus-per-task=1" in text and "-m distbn bench" in text


def test_kernel_suite_thread_counts_and_copy_ratio_per_round(monkeypatch):
    from distbn.bench import timing

    calls = []
    real = timing.sample_interleaved

    def spy(fns, *args, **kwargs):
        calls.append(list(fns))
        return real(fns, *args, **kwargs)

    monkeypatch.setattr(kernel, "sample_interleaved", spy)
    monkeypatch.setattr(kernel, "cases", lambda mode: [
        {"shape": (8, 4), "dtype": "float32", "layout": "features", "axis": -1}])
    monkeypatch.setitem(sys.modules, "torch", None)
    records = kernel.run(Context("tiny"), threads=[1, 2])
    # The copy is timed in turn with the kernels, in one interleaved run per case.
    assert all(c[0] == "copy" and "forward" in c for c in calls) and len(calls) == 2
    fwd = _by(records, "kernel.forward", "copy_fraction")
    assert len(fwd) == 2 and {r["params"]["threads"] for r in fwd} <= {1, 2}


def test_torch_suite_at_one_rank_compares_with_torch_batchnorm():
    pytest.importorskip("torch")
    from distbn.bench import frameworks

    records = frameworks.run(Context("tiny", None, stream=io.StringIO()))
    assert [r["params"]["layout"] for r in records] == ["contiguous", "channels_last"]
    for rec in records:
        assert rec["name"] == "torch.torch_bn_fwd_bwd" and rec["unit"] == "ratio"
        assert rec["value"] > 0 and rec["spread"]["repeats"] == 3
        assert rec["params"]["torch_ms"] > 0 and "ratios" not in rec["params"]


# --- `bench report` subcommand and the step suite -----------------------------------------------

def test_bench_parser_report_is_a_subcommand_beside_suite_names(capsys):
    from distbn.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "kernel", "--quick", "sync", "--ranks", "1,2"])
    assert args.suites == ["kernel", "sync"] and args.quick and args.ranks == "1,2"
    assert args.bench_command is None and args.func.__name__ == "cmd_bench"
    args = parser.parse_args(["bench", "report", "a", "b", "--out", "m"])
    assert args.bench_command == "report" and args.dirs == ["a", "b"] and args.out == "m"
    assert args.suites == [] and args.func.__name__ == "_cmd_report"
    # A run option before `report` is refused as after it (not silently ignored).
    assert main(["bench", "--tiny", "report", "somewhere"]) == 2
    assert "--tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["bench", "report", "--help"])
    assert exc.value.code == 0 and "distbn bench report DIR..." in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "kernel", "--bogus"])
    assert "--bogus" in capsys.readouterr().err


def test_step_suite_times_distbn_next_to_torch_with_a_per_layer_breakdown():
    pytest.importorskip("torch")
    from distbn.bench import step

    records = step.run(Context("tiny", None, stream=io.StringIO()))
    for rec in records:
        validate_record(rec)
    impls = {r["params"]["impl"] for r in _by(records, "step.train_step", "time")}
    assert impls == set(step.IMPLS)
    for ref in ("torch_nchw", "torch_channels_last"):
        (ratio,) = _by(records, "step.train_step", f"ratio_vs_{ref}")
        assert ratio["unit"] == "ratio" and ratio["value"] > 0 and ratio["params"]["threads"] == 1
    trainer = step.build_trainer(8)
    names = [la.name for la in trainer.model.layers]
    for impl in step.IMPLS:
        layers = [r for r in _by(records, "step.layer") if r["params"]["impl"] == impl]
        fwd = [r["params"]["layer"] for r in layers if r["metric"] == "forward_time"]
        assert fwd == names, impl  # every layer, in model order, under its distbn name
        assert [r for r in layers if r["metric"] == "rest_time"]
        assert len([r for r in layers if r["metric"] == "backward_time"]) == len(names)
    text = render_step(records)
    assert "distbn/torch (channels_last)" in text and "| conv2d" in text


def render_step(records):
    from distbn.bench.report import render_markdown

    return render_markdown({"environment": {}, "records": records})


def test_step_suite_torch_model_is_the_same_model():
    """The torch side computes what distbn's model does: same logits, loss and gradients
    on the same batch from the same weights (else the ratio compares different work)."""
    torch = pytest.importorskip("torch")
    from distbn.bench import step

    trainer = step.build_trainer(8)
    model = trainer.model
    x, labels = step._first_batch(trainer)
    model.build((None,) + x.shape[1:])
    net, names = step.torch_model(model, torch)
    assert [n for n, _ in names] == [la.name for la in model.layers]
    out = model(x, training=True)
    per_sample, dout = trainer.loss_fn(out, labels)
    model.backward(dout / len(labels))
    for channels_last in (False, True):
        ts = step._TorchStep(torch, step.torch_model(model, torch)[0], x, labels,
                             channels_last, lr=0.0, momentum=0.0)
        logits = ts.net(ts.x)
        np.testing.assert_allclose(logits.detach().numpy(), out, rtol=1e-4, atol=1e-5)
        loss = torch.nn.functional.cross_entropy(logits, ts.y)
        assert loss.item() == pytest.approx(float(np.mean(per_sample)), rel=1e-5)
        loss.backward()
        conv = ts.net[0].weight.grad.permute(2, 3, 1, 0).numpy()
        np.testing.assert_allclose(conv, model.layers[0].kernel.grad, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="'flatten'.*Flatten"):
        from distbn import Sequential
        from distbn.layers import Flatten

        bad = Sequential([Flatten(name="flatten")])
        bad.build((None, 4, 4, 3))
        step.torch_model(bad, torch)


def test_keras_suite_is_opt_in_and_records_the_measured_samples(monkeypatch):
    """`keras` runs only when named; at 1 rank it records nothing; at N ranks its records
    summarise `distbn.keras.bench.measure_sync`'s samples (a stub here: the real one
    builds MobileNetV2 twice)."""
    from distbn.bench import keras_step

    assert "keras" not in parse_suites([]) and parse_suites(["keras"]) == ["keras"]
    stream = io.StringIO()
    assert keras_step.run(Context("tiny", None, stream=stream)) == []
    assert "skipped at 1 rank" in stream.getvalue()
    pytest.importorskip("keras")
    from distbn.keras import bench as kbench

    def fake_measure(**kwargs):
        params = {"backend": "jax", "batch_per_rank": kwargs["batch"]}
        return [{"name": "keras_train_step", "metric": m, "unit": u, "world_size": 2,
                 "params": params, "values": v}
                for m, u, v in [("synchronized_s", "s", [0.3, 0.31]),
                                ("local_s", "s", [0.2, 0.21]),
                                ("sync_over_local", "ratio", [1.5, 1.4762])]]

    monkeypatch.setattr(kbench, "measure_sync", fake_measure)
    ctx = Context("tiny", None, stream=io.StringIO())
    ctx.size = 2  # as a 2-rank job's root sees it
    records = keras_step.run(ctx)
    for rec in records:
        validate_record(rec)
    (ratio,) = _by(records, "keras.keras_train_step", "sync_over_local", 2)
    assert ratio["value"] == pytest.approx((1.5 + 1.4762) / 2)
    assert ratio["spread"]["min"] == 1.4762 and ratio["params"]["batch_per_rank"] == 2
