"""`distbn.launcher`: one process-group policy for every job distbn (and its tests) start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from distbn.launcher import exit_status, run_group

# A parent that starts a child ignoring SIGTERM, prints the child's pid, then hangs.
_STUBBORN = r"""
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped by nobody yet) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_exit_status_mapping():
    assert exit_status(0) == 0 and exit_status(3) == 3
    assert exit_status(-signal.SIGKILL) == 137 and exit_status(-signal.SIGTERM) == 143
    assert exit_status(-9, timed_out=True) == 124
    assert exit_status(None, interrupted=True) == 130
    with pytest.raises(ValueError, match="not finished"):
        exit_status(None)


def test_timeout_stops_the_whole_group_sigkill_after_grace():
    start = time.monotonic()
    res = run_group([sys.executable, "-c", _STUBBORN], timeout=2.0, grace=0.5,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert res.timed_out and res.exit_code == 124 and "timed out" in res.describe()
    child = int(res.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "a grandchild that ignores SIGTERM outlived the stop"
    assert time.monotonic() - start < 15


def test_exit_code_and_captured_output():
    res = run_group([sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert (res.returncode, res.exit_code, res.stdout.strip()) == (3, 3, "hi")
    assert not res.timed_out and res.describe() == "exit code 3"
    res = run_group([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], timeout=30)
    assert res.exit_code == 137 and res.describe() == "signal 9"


def test_forwarded_sigterm_reaches_the_child_as_sigusr1(capfd):
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGUSR1, lambda s, f: sys.exit(75))\n"
              "print('ready', flush=True)\n"
              "time.sleep(30)\n"
              "sys.exit(1)\n")
    # The launcher (this process) gets SIGTERM once the child has had time to start.
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        res = run_group([sys.executable, "-c", script], timeout=60, forward_signals=True,
                        stdout=subprocess.PIPE)
    finally:
        timer.cancel()
    assert res.returncode == 75 and res.exit_code == 75, res
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    # The user learns which signal arrived; the ranks' own message can only say SIGUSR1.
    assert "distbn launch: got SIGTERM; passing it to the job as SIGUSR1" in \
        capfd.readouterr().err
