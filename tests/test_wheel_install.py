"""A non-editable install (wheel) in a fresh virtualenv: the configs the commands default
to come with the package, so `distbn bench` and `distbn compare` work outside a clone.

Offline and quick: the wheel is built without build isolation from a copy of the working
tree, and the fresh venv sees this venv's dependencies through a .pth line (but not its
editable distbn), so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info",
                               "__pycache__", ".pytest_cache", ".ruff_cache")


def _sh(cmd, cwd, timeout=120, env=None):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert res.returncode == 0, f"{cmd}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, distbn script, a scratch cwd) of a fresh venv with the wheel installed."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(REPO, src, ignore=_SKIP, symlinks=True)
    wheels = base / "wheels"
    _sh([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", wheels, src], cwd=base)
    (wheel,) = wheels.glob("distbn-*.whl")
    env_dir = base / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = Path(_sh([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                        "['purelib'])"], cwd=base).stdout.strip())
    # This venv's numpy, mpi4py, PyYAML, numba: a plain path line, so its editable distbn
    # finder (a .pth import line there) is not run.
    (purelib / "_deps_from_test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         "--no-index", wheel], cwd=base)
    work = base / "elsewhere"  # not the clone: nothing may come from the source tree
    work.mkdir()
    return python, env_dir / "bin" / "distbn", work


def test_wheel_ships_the_default_configs(installed):
    python, _, work = installed
    code = ("import distbn, distbn.configs as c, distbn.bench.scaling as s\n"
            "print(distbn.__file__)\n"
            "print(s.default_config())\n"
            "print(c.packaged_config('study'))\n")
    lines = _sh([python, "-c", code], cwd=work).stdout.split()
    assert all(str(REPO) not in line for line in lines), lines  # the wheel, not the clone
    for path in lines[1:]:
        assert Path(path).is_file() and "site-packages" in path, path
    assert Path(lines[1]).name == "quickstart.yaml" and Path(lines[2]).name == "study.yaml"


def test_wheel_commands_find_their_configs(installed):
    python, script, work = installed
    assert "[CONFIG]" in _sh([script, "compare", "--help"], cwd=work).stdout
    # A tiny `bench` of the scaling suite through mpiexec, as `bench --quick` runs it.
    env = dict(os.environ, DISTBN_KERNELS="numpy",  # no numba compile in the fresh install
               DISTBN_MPIEXEC=str(Path(sys.executable).parent / "mpiexec"))
    # mpi4py looks for the mpich wheel's libmpi beside the running venv: point it at ours.
    libmpi = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if libmpi.is_file():
        env.setdefault("MPI4PY_LIBMPI", str(libmpi))
    res = subprocess.run([script, "bench", "--tiny", "--ranks", "1", "--out", work / "b",
                          "scaling"], cwd=work, capture_output=True, text=True, timeout=120,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert (work / "b" / "results.json").is_file()
    # `compare` without CONFIG loads and checks the packaged study config (the model
    # builds); the global batch set below --ranks is then refused, before any launch.
    res = subprocess.run([script, "compare", "--out", work / "study", "--set",
                          "train.global_batch_size=1"], cwd=work, capture_output=True,
                         text=True, timeout=60, env=env)
    assert res.returncode == 2 and "smaller than --ranks" in res.stderr, res.stderr
    res = subprocess.run([script, "compare", "configs/study.yaml", "--out", work / "s"],
                         cwd=work, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2 and "distbn ships this config" in res.stderr, res.stderr
