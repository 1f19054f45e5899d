"""A rank that dies of an uncaught exception ends the whole MPI job, quickly and legibly.

Each test writes a small user script into tmp_path and runs it with the venv's mpiexec,
with and without `-m mpi4py`, in its own process group: a hang is killed after
`HARD_TIMEOUT` seconds and reported, never left running.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distbn.mpiexec import mpiexec_command, rank_env

REPO = Path(__file__).resolve().parent.parent
HARD_TIMEOUT = 60  # kill the job after this long (a hang)
ABORT_WITHIN = 20  # the bar: the job ends this fast after the failure


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def report(self) -> str:
        what = "timed out" if self.timed_out else f"exit {self.returncode}"
        return f"{what} after {self.seconds:.1f}s\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def launch(script: Path, nprocs: int = 2, via_mpi4py: bool = False) -> Run:
    argv = [sys.executable, *(["-m", "mpi4py"] if via_mpi4py else []), str(script)]
    env = rank_env()
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DISTBN_CHECK_COLLECTIVES", None)
    start = time.monotonic()
    proc = subprocess.Popen(
        mpiexec_command(nprocs, argv),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # own process group, so a hang is killed with every rank
    )
    try:
        out, err = proc.communicate(timeout=HARD_TIMEOUT)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return Run(proc.returncode, out, err, time.monotonic() - start, timed_out)


def write(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(body))
    return script


RAISE_WHILE_OTHERS_WAIT = """
    import time
    import numpy as np
    import distbn

    strategy = distbn.MPIStrategy()
    buf = np.zeros(4)
    if strategy.replica_id == {failing}:
        time.sleep(0.5)  # let the other ranks block in the allreduce first
        raise ValueError("boom on replica {failing}")
    strategy.sync_all_reduce(buf, name="bn")
    print("UNREACHABLE: allreduce returned on replica", strategy.replica_id, flush=True)
"""


@pytest.mark.parametrize(
    "via_mpi4py, failing",
    [(False, 1), (True, 1), (False, 0)],
    ids=["python-rank1", "mpi4py-rank1", "python-rank0"],
)
def test_uncaught_exception_aborts_the_job(tmp_path, via_mpi4py, failing):
    run = launch(write(tmp_path, RAISE_WHILE_OTHERS_WAIT.format(failing=failing)),
                 via_mpi4py=via_mpi4py)
    assert not run.timed_out, run.report()
    assert run.returncode != 0, run.report()
    assert run.seconds < ABORT_WITHIN, run.report()
    assert "UNREACHABLE" not in run.stdout, run.report()
    prefix = f"[rank {failing}] "
    err_lines = run.stderr.splitlines()
    assert err_lines.count(prefix + "Traceback (most recent call last):") == 1, run.report()
    assert err_lines.count(f"{prefix}ValueError: boom on replica {failing}") == 1, run.report()
    # The traceback is printed once, by the hook: no unprefixed copy from Python's default.
    assert not any(ln.startswith("Traceback") for ln in err_lines), run.report()
    assert 'user_script.py", line' in run.stderr


def test_a_users_own_excepthook_still_runs(tmp_path):
    script = write(tmp_path, """
        import sys
        import numpy as np
        import distbn

        def users_hook(exc_type, exc, tb):
            sys.stderr.write(f"USER HOOK saw {exc_type.__name__}\\n")

        sys.excepthook = users_hook
        strategy = distbn.MPIStrategy()
        strategy.barrier()
        if strategy.replica_id == 1:
            raise KeyError("missing")
        strategy.all_reduce(np.zeros(2))
    """)
    run = launch(script)
    assert not run.timed_out and run.returncode != 0, run.report()
    assert run.seconds < ABORT_WITHIN, run.report()
    assert run.stderr.count("USER HOOK saw KeyError") == 1, run.report()
    assert "[rank 1] KeyError: 'missing'" in run.stderr.splitlines(), run.report()


def test_a_clean_run_exits_zero(tmp_path):
    script = write(tmp_path, """
        import numpy as np
        import distbn

        strategy = distbn.get_strategy()
        buf = np.full(3, strategy.replica_id + 1.0)
        strategy.sync_all_reduce(buf, name="bn")
        assert buf.tolist() == [3.0] * 3, buf
        # One file per rank: the ranks' stdout lines may interleave.
        import os
        open(os.path.join(os.path.dirname(__file__), f"done-{strategy.replica_id}"), "w").close()
    """)
    run = launch(script)
    assert run.returncode == 0 and not run.timed_out, run.report()
    assert sorted(p.name for p in tmp_path.glob("done-*")) == ["done-0", "done-1"], run.report()


def test_exception_while_a_rank_waits_in_synchronized_bn(tmp_path):
    script = write(tmp_path, """
        import time
        import numpy as np
        import distbn

        strategy = distbn.MPIStrategy()
        with strategy.scope():
            bn = distbn.BatchNormalization(synchronized=True)
        if strategy.replica_id == 1:
            time.sleep(0.5)
            raise RuntimeError("rank 1 failed before its BN forward")
        bn(np.ones((4, 3), dtype=np.float32), training=True)  # rank 0 waits here
    """)
    run = launch(script)
    assert not run.timed_out and run.returncode != 0, run.report()
    assert run.seconds < ABORT_WITHIN, run.report()
    assert run.stderr.count("[rank 1] RuntimeError: rank 1 failed before its BN forward") == 1
