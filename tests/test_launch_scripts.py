"""launch/ scripts: they parse, and mpirun.sh's dry run prints the expected command."""

import os
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


@pytest.mark.parametrize("script", ["mpirun.sh", "slurm.sbatch", "bench.sbatch"])
def test_scripts_parse(script):
    path = LAUNCH / script
    if not path.exists():
        pytest.skip(f"{script} not present")
    subprocess.run(["bash", "-n", str(path)], check=True)


def dry_run(*args, **env):
    full = dict(os.environ, DRY_RUN="1", **env)
    out = subprocess.run(["bash", str(LAUNCH / "mpirun.sh"), *args], env=full,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_dry_run_command(tmp_path):
    fake = tmp_path / "mpiexec"  # a Hydra-flavoured launcher that only answers --version
    fake.write_text("#!/bin/sh\necho 'HYDRA build details:'\n")
    fake.chmod(0o755)
    cmd = dry_run("configs/quickstart.yaml", "--set", "train.steps=5", NP="3",
                  HOSTFILE="hosts.txt", THREADS="2", BIND="core", MPIEXEC=str(fake),
                  PYTHON="python3")
    assert cmd[:3] == [str(fake), "-n", "3"]
    assert cmd[3:5] == ["-f", "hosts.txt"]
    assert "-genv" in cmd and cmd[cmd.index("OMP_NUM_THREADS") + 1] == "2"
    assert cmd[cmd.index("-bind-to") + 1] == "core"
    tail = cmd[cmd.index("python3"):]
    assert tail == ["python3", "-m", "mpi4py", "-m", "distbn", "train",
                    "configs/quickstart.yaml", "--set", "train.steps=5"]


def test_open_mpi_spelling(tmp_path):
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'mpiexec (Open MPI) 5.0.3'\n")
    fake.chmod(0o755)
    cmd = dry_run("c.yaml", NP="2", HOSTFILE="h", MPIEXEC=str(fake), PYTHON="py")
    assert cmd[3:5] == ["--hostfile", "h"]
    assert "-x" in cmd and "OMP_NUM_THREADS=1" in cmd


def test_bad_rank_count_is_refused():
    out = subprocess.run(["bash", str(LAUNCH / "mpirun.sh"), "c.yaml"],
                         env=dict(os.environ, NP="two", DRY_RUN="1"),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "NP must be a positive integer, got 'two'" in out.stderr
