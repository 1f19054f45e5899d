"""`distbn train` and `distbn launch` as a user runs them: exit codes, one error message,
the printed mpiexec command, and a real 2-rank launch."""

import contextlib
import json
import os
import shlex
import stat
import sys
import textwrap

import pytest
from cli_helpers import distbn, mpiexec_python
from mpi_driver import run_mpi

from distbn import cli

TINY = textwrap.dedent("""\
    seed: 1
    data: {name: patterns, n_train: 60, n_test: 30, image_size: 8}
    model:
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same, use_bias: false}
        - {type: BatchNormalization}
        - {type: ReLU}
        - {type: GlobalAveragePooling2D}
        - {type: Dense, units: 10}
    train:
      from_logits: true  # the last Dense outputs logits
      global_batch_size: 9
      steps: 4
    logging: {every_steps: 2, progress: lines}
""")


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_train_config_error_exits_2_printed_once(tmp_path, tiny):
    r = distbn(["train", tiny, "--set", "train.stepz=3"], cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.report()
    assert r.stderr.count("unknown key 'train.stepz' (did you mean 'train.steps'?)") == 1
    assert r.stderr.startswith("distbn train: error: --set train.stepz=3: "), r.report()
    assert r.stdout == "" and not (tmp_path / "runs").exists()


def test_train_usage_error_exits_2(tmp_path):
    r = distbn(["train"], cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "CONFIG" in r.stderr, r.report()


def test_train_config_error_at_two_ranks_exits_2_promptly_printed_once(tmp_path, tiny):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("units: 10", "unitz: 10"))
    run = run_mpi(2, ["-m", "distbn", "train", str(bad), "--run-dir", str(tmp_path / "o")],
                  timeout=60)
    assert not run.timed_out and run.returncode == 2, run.failure_report()
    assert run.output.count("distbn train: error:") == 1, run.failure_report()
    assert f"{bad}:9: model.layers[4].unitz: unknown argument 'unitz'" in run.output
    assert "Abort" not in run.output  # a clean collective exit, not an MPI_Abort
    assert not (tmp_path / "o").exists()


def test_launch_prints_the_command_and_returns_its_status(tmp_path, tiny):
    # A stand-in mpiexec: shows what it was given and exits 3.
    fake = tmp_path / "fake-mpiexec"
    fake.write_text('#!/bin/sh\necho "FAKE threads=$OMP_NUM_THREADS $*"\nexit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = distbn(["launch", "-n", "3", "--mpiexec", fake, tiny, "--set", "train.steps=2",
                "--set", "seed=4", "--run-dir", "out dir", "--verbose"], env=env, timeout=60)
    assert r.returncode == 3, r.report()
    first, second = r.stdout.splitlines()[:2]
    train = [sys.executable, "-m", "mpi4py", "-m", "distbn", "train", str(tiny), "--set",
             "train.steps=2", "--set", "seed=4", "--run-dir", "out dir", "--verbose"]
    assert first == "distbn launch: " + shlex.join([str(fake), "-n", "3", *train])
    assert second == "FAKE threads=1 -n 3 " + " ".join(train)


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n must be >= 1"),
    (["-n", "2", "--hostfile", "/nonexistent/hosts"], "hostfile '/nonexistent/hosts'"),
    (["-n", "2", "--mpiexec", "/nonexistent/mpiexec"], "not found"),
])
def test_launch_usage_errors_exit_2(capsys, tiny, args, message):
    assert cli.main(["launch", *args, str(tiny)]) == 2
    assert message in capsys.readouterr().err


def test_launch_two_ranks_trains(tmp_path, tiny):
    out_dir = tmp_path / "two"
    r = distbn(["launch", "-n", "2", tiny, "--run-dir", out_dir, "--verbose"], timeout=120)
    assert r.returncode == 0 and not r.timed_out, r.report()
    assert r.stdout.startswith("distbn launch: ") and " -n 2 " in r.stdout.splitlines()[0]
    # Rank 0 summarises once; with --verbose rank 1 prints its progress lines too.
    assert r.stdout.count("[rank 0] done: 4 steps") == 1, r.report()
    assert "[rank 1] step 4/4 " in r.stdout and "[rank 0] step 4/4 " in r.stdout
    assert "2 rank(s) (MPIStrategy, synchronized BN)" in r.stdout
    assert "[rank 1] done" not in r.stdout
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").open()]
    assert [(x["split"], x["step"]) for x in records] == [
        ("train", 2), ("train", 4), ("test", 4)]
    assert (out_dir / "model.npz").is_file() and (out_dir / "config.yaml").is_file()


FAIL_ON_LAST_RANK = """
import sys
from distbn.distribute import get_strategy
from distbn.train import command, trainer

world = get_strategy()
step = trainer.Trainer.train_step

def failing_step(self):
    if self.step == 2 and self.rank == world.num_replicas_in_sync - 1:
        raise RuntimeError("injected failure on the last rank")
    return step(self)

trainer.Trainer.train_step = failing_step
sys.exit(command.run({config!r}, run_dir={out!r}, strategy=world))
"""


@pytest.mark.parametrize("via_mpi4py", [True, False])
def test_a_rank_failing_during_training_ends_the_job(tmp_path, tiny, via_mpi4py):
    script = tmp_path / "fail.py"
    script.write_text(FAIL_ON_LAST_RANK.format(config=str(tiny), out=str(tmp_path / "o")))
    # Without `-m mpi4py`, MPIStrategy's excepthook alone has to abort the job.
    r = mpiexec_python(2, [script], timeout=120, via_mpi4py=via_mpi4py)
    assert not r.timed_out and r.returncode != 0, r.report()
    assert "injected failure on the last rank" in r.stdout + r.stderr
    assert not (tmp_path / "o" / "model.npz").exists()


@pytest.mark.parametrize("value", ["foo"])
def test_bad_kernel_backend_at_two_ranks_exits_2_once_and_writes_nothing(tmp_path, tiny,
                                                                       monkeypatch, value):
    """DISTBN_KERNELS used to be read at the first BN call: after the run directory was
    written, with a traceback from every rank."""
    monkeypatch.setenv("DISTBN_KERNELS", value)
    out_dir = tmp_path / "o"
    run = run_mpi(2, ["-m", "distbn", "train", str(tiny), "--run-dir", str(out_dir)],
                  timeout=60)
    assert not run.timed_out and run.returncode == 2, run.failure_report()
    assert run.output.count("distbn train: error:") == 1, run.failure_report()
    assert "DISTBN_KERNELS" in run.output and "'foo'" in run.output, run.failure_report()
    assert "Traceback" not in run.output, run.failure_report()
    assert not out_dir.exists()


ORPHAN_PARENT = """
import subprocess, sys, os
child = subprocess.Popen([sys.executable, "-m", "distbn", "train", {config!r}, "--set",
                          "train.steps=100000", "--run-dir", {out!r}],
                         stdout=open({log!r}, "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
print(child.pid, flush=True)
while not os.path.exists(os.path.join({out!r}, "metrics.jsonl")):
    pass
os._exit(0)  # the launcher dies (as when mpiexec is SIGKILLed); the child is orphaned
"""


def test_a_run_whose_launcher_died_checkpoints_and_stops(tmp_path, tiny):
    """Ranks orphaned by a killed launcher used to train on and then hang forever."""
    import subprocess
    import time

    out_dir, log = tmp_path / "o", tmp_path / "child.log"
    script = ORPHAN_PARENT.format(config=str(tiny), out=str(out_dir), log=str(log))
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    child = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the orphaned run did not stop within 60 s")
    text = log.read_text()
    assert "after its launcher exited" in text, text
    assert list((out_dir / "checkpoints").iterdir()), text


def test_ranks_stop_with_a_checkpoint_when_distbn_launch_is_killed(tmp_path, tiny):
    """SIGKILL to `distbn launch` (mpiexec lives on): the ranks notice at the next step."""
    import signal
    import subprocess
    import time

    from cli_helpers import REPO

    from distbn.mpiexec import rank_env

    out_dir = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "distbn", "launch", "-n", "2", str(tiny),
                             "--set", "train.steps=100000", "--run-dir", str(out_dir)],
                            cwd=REPO, env=rank_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while not (out_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.kill()  # the launcher only: mpiexec and the ranks are its children
    proc.wait()
    checkpoints = out_dir / "checkpoints"
    while time.monotonic() < deadline and not any(checkpoints.glob("step-*")):
        time.sleep(0.2)
    try:
        assert any(checkpoints.glob("step-*")), "no checkpoint after the launcher died"
        time.sleep(2.0)  # the ranks exit after the checkpoint
        leftover = subprocess.run(["pgrep", "-f", f"--run-dir {out_dir}"],
                                  capture_output=True, text=True).stdout.split()
        assert leftover == [], f"ranks still running: {leftover}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_launch_warns_about_more_ranks_than_cores(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    code = cli.main(["launch", "-n", "3", str(tiny), "--mpiexec", str(tmp_path / "nope")])
    assert code == 2  # the missing mpiexec; the warning comes first
    assert "warning: 3 ranks on 2 core(s)" in capsys.readouterr().err
