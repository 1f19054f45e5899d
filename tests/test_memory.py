"""`distbn.memory.retain_freed_memory`: glibc keeps freed array memory for reuse."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from distbn import memory

# Two arrays allocated and freed per step, as a layer's output and input gradient are:
# with glibc's defaults the freed top of the heap goes back to the kernel (16 MiB, after
# the first steps) or the arrays are mapped afresh (48 MiB, above glibc's largest mmap
# threshold), and every step faults their pages in again.
_STEPS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from distbn.memory import retain_freed_memory, malloc_setting

    applied = retain_freed_memory()
    n = int(sys.argv[1]) // 4

    def step():
        y = np.empty(n, np.float32); y[:] = 1
        dx = np.empty(n, np.float32); dx[:] = 2
        return float(y[0] + dx[0])

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(applied, malloc_setting(), faults / 10)
""")
SIZES = [16 << 20, 48 << 20]


def _run(setting, nbytes):
    env = dict(os.environ, DISTBN_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", _STEPS, str(nbytes)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, name, faults = out.stdout.split()
    return applied == "True", name, float(faults)


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or
                           os.confstr("CS_GNU_LIBC_VERSION") is None, reason="needs glibc")


@glibc
@pytest.mark.parametrize("nbytes", SIZES)
def test_retained_memory_is_reused_without_page_faults(nbytes):
    applied, name, faults = _run("retain", nbytes)
    assert applied and name == "retain"
    assert faults == 0


@glibc
@pytest.mark.parametrize("nbytes", SIZES)
def test_default_setting_leaves_glibc_alone(nbytes):
    # The control: without the settings the same steps fault (about 1000 pages per step
    # at 16 MiB here), so the test above can fail.
    applied, name, faults = _run("default", nbytes)
    assert not applied and name == "default"
    assert faults > 100


def test_bad_setting_names_the_variable_and_value(monkeypatch):
    monkeypatch.setenv("DISTBN_MALLOC", "keep")
    with pytest.raises(ValueError, match=r"DISTBN_MALLOC='keep'"):
        memory.retain_freed_memory()


def test_cli_rejects_a_bad_setting_with_exit_2(tmp_path):
    env = dict(os.environ, DISTBN_MALLOC="sometimes")
    out = subprocess.run([sys.executable, "-m", "distbn", "train", str(tmp_path / "x.yaml")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "DISTBN_MALLOC='sometimes'" in out.stderr
