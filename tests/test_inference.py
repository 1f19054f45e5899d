"""After training: `distbn.load_model`, `distbn evaluate`, `distbn predict` (one process
and 2 ranks) and `distbn export --keras` (the exported model predicts what distbn does)."""

import io
import json
import textwrap

import numpy as np
import pytest
from cli_helpers import distbn as run_distbn
from mpi_driver import run_mpi

import distbn
from distbn import LocalStrategy
from distbn.train import command

CONFIG = textwrap.dedent("""\
    seed: 3
    data: {name: patterns, n_train: 60, n_test: 25, image_size: 8}
    model:
      dtype: float32
      synchronized: false
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same, use_bias: false}
        - {type: BatchNormalization, momentum: 0.5, name: bn}
        - {type: ReLU, name: stem}
        - {type: Conv2D, filters: 4, kernel_size: 1, inputs: [stem]}
        - {type: Add, inputs: [stem, conv2d_1]}
        - {type: GlobalAveragePooling2D}
        - {type: Dense, units: 10}
    train: {from_logits: true, global_batch_size: 16, steps: 6}
    logging: {every_steps: 3, progress: none}
""")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    (root / "cfg.yaml").write_text(CONFIG)
    out, err = io.StringIO(), io.StringIO()
    code = command.run(root / "cfg.yaml", run_dir=str(root / "run"), strategy=LocalStrategy(),
                       out=out, err=err)
    assert code == 0, err.getvalue()
    return root / "run"


def _test_split():
    from distbn.train.data import make_patterns

    _, _, x_test, y_test = make_patterns(60, 25, image_size=8, seed=3)
    return x_test, y_test


def test_load_model_predicts_what_the_run_evaluated(run_dir):
    model = distbn.load_model(run_dir)
    x_test, y_test = _test_split()
    probs = model.predict(x_test, batch_size=7)
    assert probs.shape == (25, 10)
    np.testing.assert_allclose(probs, model(x_test, training=False), rtol=1e-6)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    final = [r for r in records if r["split"] == "test"][-1]
    assert final["accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == y_test)))


def test_evaluate_gives_the_run_s_test_numbers(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    final = [r for r in records if r["split"] == "test"][-1]
    one = run_distbn(["evaluate", str(run_dir), "--json"], timeout=60)
    assert one.returncode == 0, one.report()
    got = json.loads(one.stdout)
    assert got["samples"] == 25 and got["loss"] == pytest.approx(final["loss"], rel=1e-6)
    # The Python path; at N ranks Trainer.evaluate's sharding is tested in
    # tests/mpi/test_trainer_mpi.py, and `distbn predict` runs at 2 ranks below.
    from distbn.train import inference

    trainer = inference.prepare_evaluation(run_dir, LocalStrategy())
    assert trainer.evaluate()["loss"] == pytest.approx(final["loss"], rel=1e-6)


def test_predict_at_two_ranks_writes_one_file_equal_to_one_process(run_dir, tmp_path):
    x_test, _ = _test_split()
    np.savez(tmp_path / "in.npz", x=x_test)
    out = tmp_path / "out.npz"
    res = run_mpi(2, ["-m", "distbn", "predict", str(run_dir), str(tmp_path / "in.npz"),
                      "--out", str(out), "--batch-size", "4"], timeout=90)
    assert res.returncode == 0, res.failure_report()
    with np.load(out) as z:
        got = z["predictions"]
    np.testing.assert_allclose(got, distbn.load_model(run_dir).predict(x_test), rtol=1e-6)
    again = run_distbn(["predict", str(run_dir), str(tmp_path / "in.npz"), "--out", str(out)],
                       timeout=60)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


@pytest.mark.parametrize("args,message", [
    (["evaluate", "NOWHERE"], "is not a run directory: it has no config.yaml"),
    (["predict", "RUN", "NOWHERE.npz", "--out", "o.npz"], "input file 'NOWHERE.npz' does "
                                                            "not exist"),
])
def test_errors_exit_2_with_the_reason(run_dir, tmp_path, args, message):
    args = [str(run_dir) if a == "RUN" else a for a in args]
    res = run_distbn(args, cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.report()


def test_export_keras_predicts_what_distbn_predicts(run_dir, tmp_path):
    keras = pytest.importorskip("keras")
    pytest.importorskip("jax")
    out = tmp_path / "model.keras"
    res = run_distbn(["export", str(run_dir), "--keras", str(out)], timeout=120,
                     env={"KERAS_BACKEND": "jax"})
    assert res.returncode == 0, res.report()
    loaded = keras.saving.load_model(out)
    x_test, _ = _test_split()
    ours = distbn.load_model(run_dir).predict(x_test)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x_test)), ours, rtol=1e-4,
                               atol=1e-5)
