"""The stall watchdog: a rank stuck in a collective says where, names who is missing,
and aborts the job.

A collective waits for every rank of its communicator. When one rank never arrives
(an endless loop, a deadlock in user code, a stuck file system, a collective called
on some ranks only) the others wait forever, and a batch job burns its allocation
silently. With a stall timeout (`DISTBN_STALL_TIMEOUT=seconds`, `MPIStrategy(
stall_timeout=...)` or the trainer's `strategy.stall_timeout`) every rank runs a daemon
thread that samples its strategy's collective counters a few times a second. A
collective still unfinished after the timeout makes that rank ask every other rank's
watchdog thread where it is (its collective count, whether it is inside one, and
which), on a private duplicate communicator, then print one line such as

    [rank 0] distbn: stalled 10.0 s in collective #57 sync_all_reduce
    'batch_normalization/forward'; ranks not arrived: [1] (rank 1 is at #56
    all_reduce 'train.metrics', not in a collective); aborting the job

and call `MPI.COMM_WORLD.Abort(1)`. A rank with a lower rank number waiting in the same
collective reports first; the others stay quiet unless it fails to.

The query needs MPI_THREAD_MULTIPLE (mpi4py's default), since the main thread is
blocked inside MPI meanwhile. Limits (docs/reliability.md): a rank whose watchdog
thread cannot run (stuck in C code that holds the GIL, or dead) does not answer and is
listed as "did not answer"; stalls outside distbn's collectives (the user's own MPI
calls, a rank stuck before its first collective with no one waiting) are not seen.
Without a timeout there is no thread, no communicator and no cost.
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import threading
import time
import weakref

from .abort import abort_job

__all__ = ["STALL_ENV_VAR", "Watchdog", "check_stall_timeout", "stall_timeout_from_env",
           "describe_stall", "stop_all"]

STALL_ENV_VAR = "DISTBN_STALL_TIMEOUT"

_QUERY, _REPLY = 1, 2
_MAX_POLL = 0.25  # seconds between samples: stall times are accurate to this
_ANSWER_WAIT = 3.0  # how long a stalled rank waits for the others' answers

_live: weakref.WeakSet = weakref.WeakSet()
_atexit_registered = False
_registry_lock = threading.Lock()


def check_stall_timeout(value, name="stall_timeout"):
    """Validate a stall timeout.

    Args:
        value: seconds (a positive finite number) or None (off).
        name: the argument's name for the message.

    Returns:
        The timeout as a float, or None.

    Raises:
        TypeError, ValueError: not a number, or not positive and finite; quoting it.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            hasattr(value, "dtype") and getattr(value, "shape", None) == ()):
        raise TypeError(f"{name} must be a positive number of seconds or None, got {value!r}")
    seconds = float(value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
    return seconds


def stall_timeout_from_env(environ=None):
    """The stall timeout `$DISTBN_STALL_TIMEOUT` asks for.

    Args:
        environ: the environment mapping (default os.environ).

    Returns:
        Seconds as a float, or None when unset, empty or 0.

    Raises:
        ValueError: not a non-negative number, quoting the value.
    """
    env = os.environ if environ is None else environ
    text = env.get(STALL_ENV_VAR, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"${STALL_ENV_VAR} must be a number of seconds (0 or unset: off), "
                         f"got {text!r}")
    return seconds or None


def describe_stall(rank, seconds, last, members, states) -> str:
    """The one-line stall report.

    Args:
        rank: the reporting rank (in the strategy's communicator).
        seconds: how long it has waited.
        last: its `(sequence number, method, name)`.
        members: the ranks the stalled collective spans.
        states: rank -> `(started, completed, last)` as each rank answered, or None when
            it did not answer; missing: not asked (no MPI_THREAD_MULTIPLE).

    Returns:
        The message, without the `[rank N]` prefix.
    """
    seq, kind, name = last
    text = f"distbn: stalled {seconds:.1f} s in collective #{seq} {kind}"
    if name is not None:
        text += f" {name!r}"
    others = [r for r in members if r != rank]
    if not states and others:
        return text + ("; cannot tell which ranks have not arrived (MPI was not "
                       "initialised with MPI_THREAD_MULTIPLE); aborting the job")
    missing = [r for r in others if r in states and states[r] is not None
               and states[r][0] < seq]
    silent = [r for r in others if states.get(r, None) is None]
    details = []
    for r in missing[:8]:
        started, completed, their_last = states[r]
        where = f"rank {r} is at #{started}"
        if their_last is not None:
            where += f" {their_last[1]}" + ("" if their_last[2] is None
                                            else f" {their_last[2]!r}")
        where += ", waiting in it" if started != completed else ", not in a collective"
        details.append(where)
    if len(missing) > 8:
        details.append(f"{len(missing) - 8} more")
    text += f"; ranks not arrived: {missing}"
    if details:
        text += f" ({'; '.join(details)})"
    if silent:
        text += (f"; rank(s) {silent} did not answer within {_ANSWER_WAIT:g} s (dead, or "
                 "stuck in code that holds the GIL)")
    if not missing and not silent:
        text += ("; every rank has reached it (a rank may have entered a different "
                 "communicator's collective: see check mode)")
    return text + "; aborting the job"


class Watchdog:
    """A daemon thread that aborts the job when its strategy stalls in a collective.

    Created (collectively) by `MPIStrategy`; not meant to be used directly.

    Args:
        strategy: the `MPIStrategy` whose counters it samples.
        comm: a private duplicate of the strategy's communicator, for queries only.
        timeout: seconds a collective may take before the job is aborted.
        abort: called with the exit code after the report (default
            `MPI.COMM_WORLD.Abort`); tests replace it.
        err: stream for the report (default sys.stderr).
    """

    def __init__(self, strategy, comm, timeout, abort=None, err=None):
        from mpi4py import MPI

        self.timeout = check_stall_timeout(timeout, "timeout")
        self._strategy = strategy
        self._comm = comm
        self._rank = comm.Get_rank()
        self._size = comm.Get_size()
        self._MPI = MPI
        self._threaded = MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._abort = abort if abort is not None else abort_job
        self._err = err
        self._stop = threading.Event()
        self._pending = []  # send requests not yet known complete
        self._query_id = 0
        self.reported = None  # the last report, for tests
        self._thread = threading.Thread(target=self._run, name="distbn-watchdog", daemon=True)
        with _registry_lock:
            global _atexit_registered
            _live.add(self)
            if not _atexit_registered:
                # Stop the threads before mpi4py finalizes MPI at exit: a thread inside
                # MPI_Iprobe during MPI_Finalize is undefined behaviour.
                atexit.register(stop_all)
                _atexit_registered = True
        self._thread.start()

    # -- lifetime -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the thread (local; idempotent). The communicator stays the caller's."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        return self._thread.is_alive()

    # -- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._watch()
        except BaseException as exc:  # never take the job down from here by accident
            if not self._stop.is_set():
                self._print(f"distbn: stall watchdog stopped: {type(exc).__name__}: {exc}")

    def _watch(self) -> None:
        s = self._strategy
        key, since, deferred = None, 0.0, 0.0
        while not self._stop.wait(min(_MAX_POLL, self.timeout / 4)):
            if self._MPI.Is_finalized():  # someone finalized without stopping us
                return
            self._serve()
            if self.reported is not None:
                continue  # an abort that returned (tests): keep answering, report once
            started, completed = s._started, s._completed
            now = time.monotonic()
            if started == completed:
                key = None
                continue
            if (started, completed) != key:
                key, since, deferred = (started, completed), now, 0.0
                continue
            waited = now - since
            if waited < self.timeout + deferred:
                continue
            last = s._last
            if last is None or last[0] != started:
                continue  # the main thread is between the two stores of _begin
            members = self._members(last[1])
            states = self._query_all() if self._threaded else {}
            if self._stop.is_set() or (s._started, s._completed) != key:
                continue  # it finished while we asked
            if not deferred and self._lower_rank_reports(last[0], members, states):
                deferred = self.timeout  # give it one more timeout to abort the job
                continue
            self.reported = describe_stall(self._rank, time.monotonic() - since, last,
                                           members, states)
            self._print(self.reported)
            self._abort(1)

    def _members(self, kind) -> list[int]:
        """The ranks (of the strategy's communicator) the current collective spans."""
        ch = self._strategy._group if kind == "sync_all_reduce" else self._strategy._world
        members = getattr(ch, "members", None)
        return list(range(self._size)) if members is None else list(members)

    def _lower_rank_reports(self, seq, members, states) -> bool:
        """Whether a lower rank waits in the same collective and will report it."""
        for r in members:
            if r >= self._rank:
                return False
            st = states.get(r)
            if st is not None and st[0] == seq and st[0] != st[1]:
                return True
        return False

    # -- queries ------------------------------------------------------------------------

    def _state(self):
        s = self._strategy
        return (s._started, s._completed, s._last)

    def _serve(self) -> None:
        """Answer every pending query with this rank's state; reap finished sends."""
        if not self._threaded:
            return
        MPI, comm = self._MPI, self._comm
        status = MPI.Status()
        while comm.iprobe(source=MPI.ANY_SOURCE, tag=_QUERY, status=status):
            source = status.Get_source()
            qid = comm.recv(source=source, tag=_QUERY)
            self._pending.append(comm.isend((qid, self._state()), dest=source, tag=_REPLY))
        self._pending = [r for r in self._pending if not r.Test()]

    def _query_all(self) -> dict:
        """Ask every other rank for its state; rank -> state, or None if it did not answer
        within `_ANSWER_WAIT` seconds."""
        MPI, comm = self._MPI, self._comm
        self._query_id += 1
        qid = (self._rank, self._query_id)
        others = [r for r in range(self._size) if r != self._rank]
        for r in others:
            self._pending.append(comm.isend(qid, dest=r, tag=_QUERY))
        answers: dict = {r: None for r in others}
        waiting = set(others)
        deadline = time.monotonic() + _ANSWER_WAIT
        status = MPI.Status()
        while waiting and time.monotonic() < deadline and not self._stop.is_set():
            self._serve()  # a rank stalled at the same time asks us too
            while comm.iprobe(source=MPI.ANY_SOURCE, tag=_REPLY, status=status):
                source = status.Get_source()
                their_qid, state = comm.recv(source=source, tag=_REPLY)
                if their_qid == qid:  # an answer to an earlier, abandoned query is stale
                    answers[source] = state
                    waiting.discard(source)
            time.sleep(0.005)
        return answers

    def query_all(self) -> dict:
        """Ask every rank for its state now (for tests; call it from one rank only, while
        the others' watchdogs run).

        Returns:
            rank -> `(started, completed, last)`, None for a rank that did not answer.
        """
        return self._query_all()

    def _print(self, text) -> None:
        try:
            stream = self._err or sys.stderr
            stream.write(f"[rank {self._rank}] {text}\n")
            stream.flush()
        except (OSError, ValueError):  # a closed stream must not keep the job alive
            pass


def stop_all() -> None:
    """Stop every watchdog thread of this process (local). Call it before
    `MPI.Finalize()`; distbn does at interpreter exit and in `distbn train`."""
    for dog in list(_live):
        dog.stop()
