"""Checkpoints in real runs: preemption by signal, exact resume, resume at another world
size, a corrupt newest checkpoint, and a checkpoint that does not fit the model."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_helpers import REPO, distbn

from distbn.mpiexec import rank_env

SMALL = ["--set", "model.dtype=float64", "--set", "data.n_train=512", "--set",
         "data.n_test=64", "--set", "train.global_batch_size=31", "--set",
         "logging.progress=lines"]


def launch(n, run_dir, *extra, timeout=120):
    return distbn(["launch", "-n", n, "configs/quickstart.yaml", *SMALL, *extra,
                   "--run-dir", run_dir], timeout=timeout)


def weights(run_dir):
    with np.load(os.path.join(run_dir, "model.npz"), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run: 12 steps, a checkpoint every 6."""
    run_dir = tmp_path_factory.mktemp("reference")
    res = launch(2, run_dir, "--set", "train.steps=12", "--set", "checkpoint.every_steps=6")
    assert res.returncode == 0, res.report()
    return run_dir


def resume_copy(reference, tmp_path, keep_step):
    """A copy of the reference run dir as if the run had stopped after `keep_step`."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    os.remove(run_dir / "model.npz")
    for ckpt in (run_dir / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > keep_step:
            shutil.rmtree(ckpt)
    return run_dir


@pytest.mark.parametrize("nprocs", [1, 3])
def test_resume_at_another_world_size_continues_the_same_batches(reference, tmp_path,
                                                                  nprocs):
    run_dir = resume_copy(reference, tmp_path, keep_step=6)
    extra = ["--set", "train.steps=12", "--set", "checkpoint.every_steps=6"]
    if nprocs == 1:
        res = distbn(["train", "configs/quickstart.yaml", *SMALL, *extra,
                      "--run-dir", run_dir])
    else:
        res = launch(nprocs, run_dir, *extra)
    assert res.returncode == 0, res.report()
    assert "resumed from step 6" in res.stdout
    # Synchronized BN: the same global batches give the same model, up to rounding.
    assert max_diff(weights(reference), weights(run_dir)) < 1e-8


def test_corrupt_newest_checkpoint_is_skipped(reference, tmp_path):
    run_dir = resume_copy(reference, tmp_path, keep_step=12)
    newest = run_dir / "checkpoints" / "step-00000012" / "weights.npz"
    data = bytearray(newest.read_bytes())
    data[100] ^= 0xFF
    newest.write_bytes(bytes(data))
    res = launch(2, run_dir, "--set", "train.steps=12", "--set", "checkpoint.every_steps=6")
    assert res.returncode == 0, res.report()
    assert "skipping checkpoint" in res.stderr and "step-00000012" in res.stderr
    assert "resumed from step 6" in res.stdout
    assert max_diff(weights(reference), weights(run_dir)) == 0.0


def test_checkpoint_that_does_not_fit_names_the_tensor(reference, tmp_path):
    run_dir = resume_copy(reference, tmp_path, keep_step=6)
    res = launch(2, run_dir, "--set", "train.steps=12", "--set", "model.layers.0.filters=8")
    assert res.returncode == 2, res.report()
    assert "does not fit this model" in res.stderr and "conv2d/kernel" in res.stderr
    assert not (run_dir / "model.npz").exists()


def test_sigterm_checkpoints_and_the_rerun_is_bitwise_identical(tmp_path):
    steps = ["--set", "train.steps=150", "--set", "checkpoint.every_steps=5"]
    full = tmp_path / "full"
    res = launch(2, full, *steps, timeout=300)
    assert res.returncode == 0, res.report()

    run_dir = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "distbn", "launch", "-n", "2", "configs/quickstart.yaml",
           *SMALL, *steps, "--run-dir", str(run_dir)]
    env = rank_env()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = run_dir / "checkpoints" / "step-00000005"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # every process: launcher, mpiexec, ranks
    sent = time.monotonic()
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job did not stop within 30 s of SIGTERM")
    assert time.monotonic() - sent < 30
    assert proc.returncode != 0, (out, err)  # 75 after a checkpoint, or killed by mpiexec
    assert not (run_dir / "model.npz").exists()

    res = launch(2, run_dir, *steps, timeout=300)
    assert res.returncode == 0, res.report()
    assert "resumed from step" in res.stdout
    assert max_diff(weights(full), weights(run_dir)) == 0.0


def test_replica_local_statistics_resume_exactly_at_the_same_world_size(tmp_path):
    """Each replica's own moving statistics are in the checkpoint, not only their mean."""
    extra = ["--set", "train.steps=12", "--set", "checkpoint.every_steps=6",
             "--set", "model.synchronized=false", "--set", "checkpoint.keep=5"]
    full = tmp_path / "full"
    res = launch(2, full, *extra)
    assert res.returncode == 0, res.report()
    run_dir = resume_copy(full, tmp_path, keep_step=6)
    res = launch(2, run_dir, *extra)
    assert res.returncode == 0 and "resumed from step 6" in res.stdout, res.report()
    assert max_diff(weights(full), weights(run_dir)) == 0.0
