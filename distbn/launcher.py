"""Run a command (usually `mpiexec ...`) as its own process group, with one stop policy.

Every place that starts a job and must be able to end it all (`distbn launch`, `bench`,
`compare`, the test helpers) goes through `run_group`:

* the child starts a new session, so its process group holds mpiexec and every rank it
  starts, and nothing of it outlives a stop;
* on timeout or Ctrl-C (KeyboardInterrupt): SIGTERM to the group, a grace period for the
  group to go, then SIGKILL to what is left (`stop_group`);
* optionally (`forward_signals`, for `distbn launch`): SIGTERM and SIGUSR1 sent to this
  process are passed to the child as SIGUSR1 (Hydra ends the ranks at once on SIGTERM,
  before they can checkpoint; SIGUSR1 it forwards, and the ranks checkpoint and exit 75),
  and a first Ctrl-C is passed to the group as SIGINT, as a terminal would (the ranks
  stop gracefully); a second Ctrl-C applies the stop policy;
* one exit-code mapping (`exit_status`): the child's code; killed by signal S: 128 + S;
  timed out: 124 (as coreutils' `timeout`); interrupted: 130.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time

__all__ = ["DEFAULT_GRACE_S", "TIMEOUT_EXIT", "INTERRUPT_EXIT", "GroupResult", "exit_status",
           "stop_group", "run_group", "run_mpiexec"]

#: Seconds a stopped group gets between SIGTERM and SIGKILL.
DEFAULT_GRACE_S = 5.0
TIMEOUT_EXIT = 124
INTERRUPT_EXIT = 130


def exit_status(returncode: int | None, timed_out: bool = False,
                interrupted: bool = False) -> int:
    """The exit code a command reports for its child.

    Args:
        returncode: the child's `Popen.returncode` (negative: killed by that signal).
        timed_out: it was stopped at its timeout.
        interrupted: it was stopped by Ctrl-C.

    Returns:
        130 when interrupted, 124 when timed out, 128 + S when killed by signal S, else
        the child's code.
    """
    if interrupted:
        return INTERRUPT_EXIT
    if timed_out:
        return TIMEOUT_EXIT
    if returncode is None:
        raise ValueError("exit_status: the child has not finished (returncode None)")
    return 128 - returncode if returncode < 0 else returncode


@dataclasses.dataclass
class GroupResult:
    """How a `run_group` child ended.

    Attributes:
        returncode: the child's own `Popen.returncode` (negative: killed by a signal).
        stdout, stderr: captured text (None when not captured).
        seconds: wall time from start to end.
        timed_out: stopped at the timeout.
        interrupted: stopped by Ctrl-C.
    """

    returncode: int
    stdout: str | None
    stderr: str | None
    seconds: float
    timed_out: bool = False
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """`exit_status` of this result."""
        return exit_status(self.returncode, self.timed_out, self.interrupted)

    def describe(self) -> str:
        """"exit code 3", "signal 9", "timed out after 12.0 s" or "interrupted"."""
        if self.interrupted:
            return "interrupted"
        if self.timed_out:
            return f"timed out after {self.seconds:.1f} s"
        if self.returncode < 0:
            return f"signal {-self.returncode}"
        return f"exit code {self.returncode}"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen, grace: float = DEFAULT_GRACE_S) -> None:
    """SIGTERM `proc`'s process group, wait up to `grace` seconds for all of it to go,
    then SIGKILL what is left. `proc` must lead its group (`start_new_session=True`).

    Args:
        proc: the group leader.
        grace: seconds between SIGTERM and SIGKILL.
    """
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()
        return
    deadline = time.monotonic() + max(grace, 0.0)
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader: a zombie would keep the group "alive"
        if not _group_alive(pgid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def _forwarding(proc: subprocess.Popen, label: str = "distbn launch"):
    """While the child runs: SIGTERM/SIGUSR1 -> SIGUSR1 to it; a first SIGINT -> SIGINT
    to its group; a second SIGINT -> KeyboardInterrupt (the stop policy)."""
    interrupts = []

    def forward(signum, frame):
        if proc.poll() is not None:
            return
        if signum == signal.SIGINT:
            if interrupts:
                raise KeyboardInterrupt
            interrupts.append(signum)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            return
        # Say which signal arrived as it was sent: the ranks only see SIGUSR1.
        print(f"{label}: got {signal.Signals(signum).name}; passing it to the job as "
              "SIGUSR1 (the ranks checkpoint at the next step and exit 75)",
              file=sys.stderr, flush=True)
        proc.send_signal(signal.SIGUSR1)

    stops = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {s: signal.signal(s, forward) for s in stops}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_group(cmd, *, env=None, cwd=None, timeout: float | None = None,
              grace: float = DEFAULT_GRACE_S, stdin=subprocess.DEVNULL, stdout=None,
              stderr=None, text: bool = True, forward_signals: bool = False) -> GroupResult:
    """Run `cmd` in a new session (its own process group) under the module's policy.

    Args:
        cmd: the argv (items are converted with str()).
        env, cwd: for the child (default: this process's).
        timeout: seconds before the group is stopped (None: no limit).
        grace: seconds between SIGTERM and SIGKILL when stopping.
        stdin: the child's (default /dev/null: a process outside the terminal's session
            must not read it).
        stdout, stderr: as `subprocess.Popen` (e.g. subprocess.PIPE to capture,
            subprocess.STDOUT to merge); None inherits.
        text: captured output as str.
        forward_signals: pass stop signals on (see the module docstring); main thread
            only.

    Returns:
        A `GroupResult` (`exit_code` maps it to this process's exit status).
    """
    start = time.monotonic()
    proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdin=stdin,
                            stdout=stdout, stderr=stderr, text=text, start_new_session=True)
    timed_out = interrupted = False
    with _forwarding(proc) if forward_signals else contextlib.nullcontext():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        except KeyboardInterrupt:  # the new session does not get the terminal's SIGINT
            interrupted = True
        if timed_out or interrupted:
            stop_group(proc, grace)
            out, err = proc.communicate()
    return GroupResult(proc.returncode, out, err, time.monotonic() - start, timed_out,
                       interrupted)


def run_mpiexec(nprocs: int, argv, *, mpiexec: str | None = None, hostfile: str | None = None,
                tag_output: bool = False, env=None, **kwargs) -> GroupResult:
    """`mpiexec -n nprocs argv...` through `run_group`, one BLAS/OpenMP thread per rank.

    Args:
        nprocs, argv, mpiexec, hostfile, tag_output: as `distbn.mpiexec.mpiexec_command`.
        env: the base environment (default os.environ); thread variables the user set
            are kept (`rank_env`).
        **kwargs: passed to `run_group`.

    Returns:
        The `GroupResult`.

    Raises:
        FileNotFoundError: no mpiexec found.
    """
    from distbn.mpiexec import mpiexec_command, rank_env

    cmd = mpiexec_command(nprocs, list(argv), mpiexec=mpiexec, hostfile=hostfile,
                          tag_output=tag_output)
    return run_group(cmd, env=rank_env(env), **kwargs)
