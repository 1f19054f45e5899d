"""`distbn.memory.retain_freed_memory`: glibc keeps freed array memory for reuse."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from distbn import memory

# Two 16 MiB arrays allocated and freed per step, as a layer's output and input gradient
# are: with glibc's defaults the freed top of the heap goes back to the kernel and every
# step faults its pages in again.
_STEPS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from distbn.memory import retain_freed_memory, malloc_setting

    applied = retain_freed_memory()

    def step():
        y = np.empty(4 << 20, np.float32); y[:] = 1
        dx = np.empty(4 << 20, np.float32); dx[:] = 2
        return float(y[0] + dx[0])

    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(applied, malloc_setting(), faults / 10)
""")


def _run(setting):
    env = dict(os.environ, DISTBN_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", _STEPS], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, name, faults = out.stdout.split()
    return applied == "True", name, float(faults)


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or
                           os.confstr("CS_GNU_LIBC_VERSION") is None, reason="needs glibc")


@glibc
def test_retained_memory_is_reused_without_page_faults():
    applied, name, faults = _run("retain")
    assert applied and name == "retain"
    assert faults == 0


@glibc
def test_default_setting_leaves_glibc_alone():
    # The control: without the thresholds the same steps fault (1006 pages per step
    # measured here), so the test above can fail.
    applied, name, faults = _run("default")
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
