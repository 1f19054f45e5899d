"""Reliability promises as a user meets them: real `distbn train`/`distbn launch` and
`mpiexec python script.py` processes, each in its own process group with a hard
timeout (docs/reliability.md lists which test covers which promise).

Failures are injected with `DISTBN_FAULT` (distbn/faults.py) or by a small user
script; times are checked against generous upper bounds only. The runs use the numpy
kernels: they are not under test here, and numba's JIT compilation (up to a minute from
a cold cache) would otherwise dominate the time bounds, which measure from start-up.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from cli_helpers import REPO, distbn, run

from distbn.mpiexec import mpiexec_command, rank_env

ABORT_WITHIN = 20  # s: an exception on one rank ends the job
KILL_WITHIN = 30  # s: a SIGKILLed rank ends the job
STALL_WITHIN = 15  # s: a 2 s stall timeout, reported and aborted (start-up included)
HARD_TIMEOUT = 90  # s: a hang is killed and fails the test

TINY = textwrap.dedent("""\
    seed: 1
    data: {name: patterns, n_train: 64, n_test: 32, image_size: 8}
    model:
      layers:
        - {type: Conv2D, filters: 4, kernel_size: 3, padding: same, use_bias: false}
        - {type: BatchNormalization}
        - {type: ReLU}
        - {type: GlobalAveragePooling2D}
        - {type: Dense, units: 10}
    train:
      from_logits: true  # the last Dense outputs logits
      global_batch_size: 16
      steps: 6
    logging: {every_steps: 1, progress: lines}
""")


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def env_with(**extra):
    """This environment without distbn's fault/stall settings, numpy kernels, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISTBN_FAULT", "DISTBN_STALL_TIMEOUT")}
    env["DISTBN_KERNELS"] = "numpy"
    env.update(extra)
    return env


def count_lines(text, needle):
    return sum(needle in line for line in text.splitlines())


# --- an exception on one rank ends every rank ----------------------------------------------


@pytest.mark.parametrize("fault, rank, text", [
    ("data:1@3", 1, "FaultInjected: injected fault at 'data' on rank 1 (arrival 3"),
    ("bn_forward:1@2", 1, "FaultInjected: injected fault at 'bn_forward' on rank 1"),
], ids=["data-loading", "bn-forward"])
def test_exception_on_one_rank_during_training_ends_the_job(tmp_path, tiny, fault, rank, text):
    r = distbn(["launch", "-n", 2, tiny, "--run-dir", tmp_path / "out"],
               timeout=HARD_TIMEOUT, env=env_with(DISTBN_FAULT=fault))
    assert not r.timed_out and r.returncode not in (0, 2), r.report()
    assert r.seconds < ABORT_WITHIN, r.report()
    assert count_lines(r.stderr, f"[rank {rank}] distbn.faults.{text}") == 1, r.report()
    assert count_lines(r.stderr, f"[rank {rank}] Traceback (most recent call last):") == 1
    assert not (tmp_path / "out" / "model.npz").exists()


def test_exception_while_rank_0_writes_a_checkpoint_ends_the_job(tmp_path, tiny):
    out = tmp_path / "out"
    r = distbn(["launch", "-n", 2, tiny, "--run-dir", out, "--set", "checkpoint.every_steps=2"],
               timeout=HARD_TIMEOUT, env=env_with(DISTBN_FAULT="checkpoint:0@2"))
    assert not r.timed_out and r.returncode not in (0, 2), r.report()
    assert r.seconds < ABORT_WITHIN, r.report()
    assert count_lines(r.stderr, "[rank 0] distbn.faults.FaultInjected: injected fault at "
                                 "'checkpoint' on rank 0 (arrival 2") == 1, r.report()
    # The first checkpoint is whole; the one being written never appears under its name.
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert not (out / "model.npz").exists()


def test_exception_in_data_loading_at_start_is_a_collective_exit_1(tmp_path, tiny):
    r = distbn(["launch", "-n", 2, tiny, "--run-dir", tmp_path / "out"],
               timeout=HARD_TIMEOUT, env=env_with(DISTBN_FAULT="data_load:1"))
    assert not r.timed_out and r.returncode == 1, r.report()
    assert r.seconds < ABORT_WITHIN, r.report()
    assert r.stderr.count("distbn train: error: [rank 1] Traceback") == 1, r.report()
    assert r.stderr.count("FaultInjected: injected fault at 'data_load' on rank 1") == 1
    assert "Abort" not in r.stderr  # every rank returned 1 together
    assert not (tmp_path / "out").exists()


# --- a SIGKILLed rank ends the job -----------------------------------------------------------


def _rank_pids(marker):
    """pid -> PMI rank of the Python ranks whose command line contains `marker`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = dict(item.split(b"=", 1) for item in fh.read().split(b"\0")
                               if b"=" in item)
        except OSError:  # gone, or not ours
            continue
        words = [a.decode(errors="replace") for a in argv]
        line = " ".join(words)
        if marker in line and "mpi4py" in words and "launch" not in words \
                and not any(w.endswith("mpiexec") or "hydra" in w for w in words):
            if b"PMI_RANK" in environ:
                found[int(entry)] = int(environ[b"PMI_RANK"])
    return found


@pytest.mark.parametrize("victim", [1])
def test_sigkill_of_one_rank_ends_the_job(tmp_path, tiny, victim):
    out = tmp_path / "sigkill-run"
    cmd = [sys.executable, "-m", "distbn", "launch", "-n", "2", str(tiny), "--run-dir",
           str(out), "--set", "train.steps=100000", "--set", "data.n_train=256"]
    env = rank_env(env_with(PYTHONUNBUFFERED="1"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + HARD_TIMEOUT
        pids = {}
        # Training has begun once rank 0 has logged a step.
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and metrics.stat().st_size:
                pids = _rank_pids(str(out))
                if len(pids) == 2:
                    break
            time.sleep(0.1)
        assert proc.poll() is None and len(pids) == 2, (pids, proc.poll())
        pid = next(p for p, rank in pids.items() if rank == victim)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        try:
            _, err = proc.communicate(timeout=KILL_WITHIN + 30)
        except subprocess.TimeoutExpired:
            pytest.fail("the job outlived a SIGKILLed rank by a minute")
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0, err
    assert took < KILL_WITHIN, (took, err)
    assert _rank_pids(str(out)) == {}, "a rank outlived the job"
    print(f"SIGKILL of rank {victim}: job ended {took:.1f} s later, exit {proc.returncode}")


# --- the stall watchdog ----------------------------------------------------------------------

STALL_SCRIPT = """
import time
import numpy as np
import distbn

strategy = distbn.MPIStrategy()
with strategy.scope():
    bn = distbn.BatchNormalization(synchronized=True)
x = np.ones((4, 3), dtype=np.float32)
bn(x, training=True)  # both ranks: forward #1
if strategy.replica_id == 1:
    time.sleep(60)  # never arrives at the next forward
bn(x, training=True)
print("UNREACHABLE", flush=True)
"""


def test_watchdog_names_the_stalled_collective_and_the_missing_rank(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL_SCRIPT)
    # numpy kernels: no JIT warm-up, so the 2 s timeout measures only the stall.
    env = env_with(DISTBN_STALL_TIMEOUT="2")
    r = run(mpiexec_command(2, [sys.executable, str(script)]), HARD_TIMEOUT, env=env)
    assert not r.timed_out and r.returncode != 0, r.report()
    assert r.seconds < STALL_WITHIN, r.report()
    assert "UNREACHABLE" not in r.stdout
    report = [ln for ln in r.stderr.splitlines() if "distbn: stalled" in ln]
    assert len(report) == 1, r.report()
    assert report[0].startswith("[rank 0] distbn: stalled "), r.report()
    assert (" s in collective #2 sync_all_reduce 'batch_normalization/forward'; ranks not "
            "arrived: [1] (rank 1 is at #1 sync_all_reduce 'batch_normalization/forward', "
            "not in a collective); aborting the job") in report[0], r.report()
    print(f"watchdog: job ended after {r.seconds:.1f} s; {report[0]}")


def test_watchdog_from_the_config_under_distbn_launch(tmp_path, tiny):
    r = distbn(["launch", "-n", 2, tiny, "--run-dir", tmp_path / "out", "--set",
                "strategy.stall_timeout=2"], timeout=HARD_TIMEOUT,
               env=env_with(DISTBN_FAULT="bn_forward:1@4=sleep:60"))
    assert not r.timed_out and r.returncode != 0, r.report()
    assert r.seconds < STALL_WITHIN + 10, r.report()
    assert count_lines(r.stderr, "[rank 1] distbn: injected stall of 60 s at 'bn_forward'") == 1
    report = [ln for ln in r.stderr.splitlines() if "distbn: stalled" in ln]
    assert len(report) == 1 and report[0].startswith("[rank 0] "), r.report()
    assert "sync_all_reduce 'batch_normalization/forward'; ranks not arrived: [1]" in report[0]


# --- bad configs at 1 and 2 ranks, as processes ----------------------------------------------

DONE_WHEN = ["unknown_key_layer", "unknown_key_train", "wrong_type_int", "malformed_yaml",
             "python_tag_apply"]


def _bad(name):
    path = REPO / "configs" / "bad" / f"{name}.yaml"
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("# expect: "))
    return path, line[len("# expect: "):].replace("{config}", str(path))


@pytest.mark.parametrize("nprocs", [1, 2])
@pytest.mark.parametrize("name", DONE_WHEN)
def test_bad_config_process_exits_2_promptly_printed_once(tmp_path, name, nprocs):
    path, message = _bad(name)
    args = ["train", path] if nprocs == 1 else ["launch", "-n", 2, path]
    r = distbn(args, timeout=HARD_TIMEOUT, cwd=tmp_path, env=env_with())
    assert not r.timed_out and r.returncode == 2, r.report()
    assert r.seconds < ABORT_WITHIN, r.report()
    assert r.stderr.count("distbn train: error:") == 1, r.report()
    assert f"distbn train: error: {message}\n" in r.stderr, r.report()
    assert "Abort" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no file a tag could write


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_and_world_size_give_identical_losses(tmp_path, tiny):
    env = env_with()
    del env["DISTBN_KERNELS"]  # the default kernels: what users run (no time bound here)
    losses = []
    for name in ("a", "b"):
        r = distbn(["launch", "-n", 2, tiny, "--run-dir", tmp_path / name, "--set",
                    "train.eval_every=3"], timeout=HARD_TIMEOUT, env=env)
        assert r.returncode == 0, r.report()
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        losses.append([(x["split"], x["step"], x["loss"], x["accuracy"]) for x in records])
    assert len(losses[0]) == 8  # 6 train lines, 2 evaluations
    assert losses[0] == losses[1]  # bitwise: no tolerance
