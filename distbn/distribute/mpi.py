"""`MPIStrategy`: the collectives of data-parallel training over an MPI communicator.

mpi4py is imported when an MPIStrategy is created, never when distbn is imported.
Buffers go through the uppercase (buffer) API, `Allreduce(IN_PLACE, buf, op)`, which
sends the array's memory directly; only the object helpers pickle.
"""

from __future__ import annotations

import numpy as np

from distbn.faults import maybe_fail

from .abort import install_abort_hook
from .buffers import check_buffer, check_op, check_root
from .check import Descriptor, check_from_env, verify
from .strategy import Strategy
from .watchdog import Watchdog, check_stall_timeout, stall_timeout_from_env

__all__ = ["MPIStrategy"]


class _Channel:
    """One communicator the strategy talks on, its sequence number, and its check twin."""

    __slots__ = ("comm", "size", "check_comm", "seq", "members", "spare")

    def __init__(self, comm, size: int, check_comm, members=None):
        self.comm = comm
        self.size = size
        self.check_comm = check_comm  # a Dup used only for descriptors; None unless checking
        self.seq = 0
        self.members = members  # its ranks in the strategy's communicator (None: all)
        self.spare = None  # the check Dup while check mode is switched off, for reuse


class _Closed:
    """Stands in for a freed communicator so a closed strategy fails with a clear message."""

    def __getattr__(self, attr):
        raise RuntimeError("this MPIStrategy is closed; create a new one")


class MPIStrategy(Strategy):
    """Data parallelism over an MPI communicator: one replica per rank.

    The strategy works on a private duplicate of `comm` (so its messages never mix with
    the caller's), which keeps `comm`'s class: a subclass of `MPI.Intracomm` sees every
    call the strategy makes. With one rank nothing is duplicated and no MPI call is made.
    Creating a strategy is collective over `comm`. Spanning more than one rank installs
    a `sys.excepthook` that aborts the whole job on any uncaught exception.

    Args:
        comm: an `mpi4py.MPI.Intracomm` (default `MPI.COMM_WORLD`).
        sync_group: which replicas combine batch-norm statistics: None for all of them,
            an int k for consecutive groups of k ranks (k must divide the size), or
            "node" for the ranks sharing a node. Every other collective spans all ranks.
        check: compare a descriptor of every collective across ranks first and raise
            `CollectiveMismatchError` on a mismatch; None reads $DISTBN_CHECK_COLLECTIVES.
            If any rank asks for it, every rank does it. `set_check` switches it later.
        stall_timeout: seconds a collective may wait before the stall watchdog reports
            which ranks have not arrived and aborts the job (`distbn.distribute.watchdog`);
            None reads $DISTBN_STALL_TIMEOUT (unset or 0: off, no thread, no cost). If
            ranks differ, the smallest timeout given applies on every rank.

    Raises:
        TypeError: `comm` is not an Intracomm, `sync_group` or `check` of the wrong type.
        ValueError: `comm` is COMM_NULL, or a bad or rank-dependent `sync_group`.
    """

    def __init__(self, comm=None, sync_group=None, check: bool | None = None,
                 stall_timeout: float | None = None):
        from mpi4py import MPI

        base = MPI.COMM_WORLD if comm is None else comm
        if isinstance(base, MPI.Comm) and base == MPI.COMM_NULL:
            raise ValueError("comm must be a valid communicator, got MPI.COMM_NULL")
        if not isinstance(base, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py MPI.Intracomm, got {base!r}")
        size, rank = base.Get_size(), base.Get_rank()
        sync_group = _normalize_sync_group(sync_group, size)
        if check is None:
            check = check_from_env()
        elif not isinstance(check, (bool, np.bool_)):
            raise TypeError(f"check must be True, False or None, got {check!r}")
        if stall_timeout is None:
            stall_timeout = stall_timeout_from_env()
        else:
            stall_timeout = check_stall_timeout(stall_timeout)

        self._size, self._rank, self._sync_group = size, rank, sync_group
        self._in_place = MPI.IN_PLACE
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        # [started, completed, last native number, its name's index]: an array, so
        # compiled collectives (distbn.distribute.native) keep the same books.
        self._counts = np.zeros(4, dtype=np.int64)
        self._native_names = []
        self._last_python = None
        self._owned = []  # communicators this strategy created and must free
        self._closed = False
        self._world = self._group = self._native_comm = None
        self._watchdog = None
        if size == 1:
            # One replica never communicates: keep the caller's comm, no Dup, no channels.
            self._comm, self._world, self._group, self._check = base, None, None, bool(check)
            return

        self._comm = self._own(base.Dup())
        settings = self._comm.allgather((sync_group, bool(check), stall_timeout))
        groups = [g for g, _, _ in settings]
        if any(g != groups[0] for g in groups):
            self.close()
            raise ValueError(
                "sync_group must be the same on every rank, got "
                + ", ".join(f"rank {r}: {g!r}" for r, g in enumerate(groups))
            )
        self._check = any(c for _, c, _ in settings)
        self._world = self._channel(self._comm, size)
        self._group = self._make_group(MPI, sync_group)
        # Compiled collectives (distbn.distribute.native) run on XLA's threads, unordered
        # with the Python ones: their own communicator keeps the two streams apart.
        self._native_comm = None if self._group is None else self._own(self._group.comm.Dup())
        install_abort_hook()
        timeouts = [t for _, _, t in settings if t is not None]
        if timeouts:
            self.set_stall_timeout(min(timeouts))

    # -- layout ---------------------------------------------------------------------

    @property
    def num_replicas_in_sync(self) -> int:
        return self._size

    @property
    def replica_id(self) -> int:
        return self._rank

    @property
    def sync_group_size(self) -> int:
        return 1 if self._group is None else self._group.size

    @property
    def sync_group(self):
        """The `sync_group` setting: None, an int, or "node"."""
        return self._sync_group

    @property
    def check(self) -> bool:
        """Whether collectives are checked across ranks before they run."""
        return self._check

    @property
    def stall_timeout(self) -> float | None:
        """Seconds a collective may wait before the watchdog aborts the job; None: off."""
        return None if self._watchdog is None else self._watchdog.timeout

    @property
    def comm(self):
        """The strategy's communicator (a duplicate of the one given, same class)."""
        return self._comm

    @property
    def collective_count(self) -> int:
        return self._started

    @property
    def in_collective(self) -> bool:
        return self._started != self._completed

    @property
    def last_collective(self) -> tuple | None:
        return self._last

    # The counters, as ints (the watchdog samples them from its thread).
    @property
    def _started(self) -> int:
        return int(self._counts[0])

    @_started.setter
    def _started(self, value) -> None:
        self._counts[0] = value

    @property
    def _completed(self) -> int:
        return int(self._counts[1])

    @_completed.setter
    def _completed(self, value) -> None:
        self._counts[1] = value

    @property
    def _last(self):
        native, python = int(self._counts[2]), self._last_python
        if native and (python is None or native > python[0]):
            return (native, "sync_all_reduce", self._native_names[int(self._counts[3])])
        return python

    @_last.setter
    def _last(self, value) -> None:
        self._last_python = value

    # -- collectives ----------------------------------------------------------------

    def all_reduce(self, buf, op: str = "sum", name: str | None = None):
        check_op(op)
        check_buffer(buf)
        ch = self._world
        if ch is None:
            return buf
        self._begin(ch, "all_reduce", name, buf=buf, op=op)
        ch.comm.Allreduce(self._in_place, buf, self._ops[op])
        self._completed += 1
        return buf

    def sync_all_reduce(self, buf, name: str | None = None):
        check_buffer(buf)
        ch = self._group
        if ch is None:
            return buf
        if name is not None and str(name).endswith("/forward"):
            # DISTBN_FAULT's "bn_forward" point lives at the collective seam, so layers
            # and adapters import nothing test-only; before `_begin`, so a stall injected
            # here leaves this rank "not arrived" for the watchdog.
            maybe_fail("bn_forward")
        self._begin(ch, "sync_all_reduce", name, buf=buf, op="sum")
        ch.comm.Allreduce(self._in_place, buf, self._ops["sum"])
        self._completed += 1
        return buf

    def broadcast(self, buf, root: int = 0, name: str | None = None):
        root = check_root(root, self._size)
        check_buffer(buf)
        ch = self._world
        if ch is None:
            return buf
        self._begin(ch, "broadcast", name, buf=buf, root=root)
        ch.comm.Bcast(buf, root=root)
        self._completed += 1
        return buf

    def barrier(self, name: str | None = None) -> None:
        ch = self._world
        if ch is None:
            return
        self._begin(ch, "barrier", name)
        ch.comm.Barrier()
        self._completed += 1

    def allgather_object(self, obj, name: str | None = None) -> list:
        ch = self._world
        if ch is None:
            return [obj]
        self._begin(ch, "allgather_object", name)
        out = ch.comm.allgather(obj)
        self._completed += 1
        return out

    def broadcast_object(self, obj, root: int = 0, name: str | None = None):
        root = check_root(root, self._size)
        ch = self._world
        if ch is None:
            return obj
        self._begin(ch, "broadcast_object", name, root=root)
        out = ch.comm.bcast(obj, root=root)
        self._completed += 1
        return out

    # -- switches -------------------------------------------------------------------

    def set_check(self, check: bool) -> None:
        """Switch check mode on or off (collective: every rank, same point, same value).

        The trainer checks its first steps this way and then runs unchecked. Switching
        on the first time duplicates the communicators (collective); later switches
        reuse them.

        Args:
            check: True to compare every collective's descriptor across ranks first.
        """
        if not isinstance(check, (bool, np.bool_)):
            raise TypeError(f"check must be True or False, got {check!r}")
        check = bool(check)
        if check == self._check:
            return
        self._check = check
        channels = [ch for ch in (self._world, self._group) if ch is not None]
        for ch in dict.fromkeys(channels):  # the group may be the world channel itself
            if check:
                ch.check_comm = ch.spare if ch.spare is not None else self._own(ch.comm.Dup())
                ch.spare = None
            else:
                ch.spare, ch.check_comm = ch.check_comm, None

    def set_stall_timeout(self, seconds: float | None) -> None:
        """Start, retune or stop the stall watchdog (collective the first time it starts:
        every rank, same point, same value).

        Args:
            seconds: a positive number of seconds, or None to stop watching.
        """
        seconds = check_stall_timeout(seconds, "seconds")
        if self._world is None:  # one replica never waits for another
            return
        if seconds is None:
            if self._watchdog is not None:
                self._watchdog.stop()
                self._watchdog = None
            return
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.timeout = seconds
            return
        if not hasattr(self, "_watch_comm"):
            self._watch_comm = self._own(self._comm.Dup())
        self._watchdog = Watchdog(self, self._watch_comm, seconds)

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Free the communicators this strategy created (collective; idempotent).

        Later collectives on a multi-rank strategy raise RuntimeError.
        """
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:  # before its communicator is freed
            self._watchdog.stop()
            self._watchdog = None
        for c in reversed(self._owned):
            c.Free()
        self._owned.clear()
        for ch in (self._world, self._group):
            if ch is not None:
                ch.comm = ch.check_comm = _Closed()

    def __repr__(self) -> str:
        return (
            f"MPIStrategy(num_replicas_in_sync={self._size}, replica_id={self._rank}, "
            f"sync_group={self._sync_group!r}, sync_group_size={self.sync_group_size}, "
            f"check={self._check}, stall_timeout={self.stall_timeout})"
        )

    # -- internals ------------------------------------------------------------------

    def _begin(self, ch: _Channel, kind: str, name, buf=None, op=None, root=None) -> None:
        # Counting costs two integer increments; the descriptor exists only in check mode.
        ch.seq += 1
        self._started += 1
        self._last = (self._started, kind, name)
        if ch.check_comm is not None:
            desc = Descriptor(
                seq=ch.seq,
                kind=kind,
                op=op,
                shape=None if buf is None else tuple(buf.shape),
                dtype=None if buf is None else buf.dtype.name,
                root=root,
                name=None if name is None else str(name),
            )
            try:
                verify(ch.check_comm, self._rank, desc)
            except BaseException:
                self._completed += 1  # the collective will not run: not "in" it
                raise

    def _own(self, comm):
        self._owned.append(comm)
        return comm

    def _channel(self, comm, size: int, members=None) -> _Channel:
        return _Channel(comm, size, self._own(comm.Dup()) if self._check else None, members)

    def _make_group(self, MPI, sync_group) -> _Channel | None:
        """The channel for batch-norm statistics; None when the group is this rank alone."""
        if sync_group is None or sync_group == self._size:
            return self._world  # same channel: check mode also catches world/group mix-ups
        if sync_group == 1:
            return None
        if sync_group == "node":
            sub = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self._rank)
        else:
            sub = self._comm.Split(color=self._rank // sync_group, key=self._rank)
        n = sub.Get_size()
        if n == self._size or n == 1:  # the same on every rank of `sub`, so Free pairs up
            sub.Free()
            return self._world if n == self._size else None
        # Which strategy ranks share this group: the stall report names the missing ones.
        mine, whole = sub.Get_group(), self._comm.Get_group()
        members = tuple(MPI.Group.Translate_ranks(mine, list(range(n)), whole))
        mine.Free()
        whole.Free()
        return self._channel(self._own(_adopt(sub, type(self._comm))), n, members)


def _adopt(comm, cls):
    """`comm` as an instance of `cls` (the caller's Intracomm subclass), sharing its handle.

    mpi4py 4 keeps the subclass through Dup but returns a plain Intracomm from Split and
    Split_type; re-wrapping lets a subclass the user passed in see the group's calls too.
    Like Dup, it does not run the subclass's __init__.
    """
    if type(comm) is cls:
        return comm
    return cls.__new__(cls, comm)


def _normalize_sync_group(sync_group, size: int):
    """Validate `sync_group` for `size` ranks; return None, an int, or "node"."""
    if sync_group is None:
        return None
    if isinstance(sync_group, str):
        if sync_group == "node":
            return "node"
        raise ValueError(
            f"sync_group must be None, a positive int or 'node', got {sync_group!r}"
        )
    if isinstance(sync_group, (bool, np.bool_)) or not isinstance(sync_group, (int, np.integer)):
        raise TypeError(f"sync_group must be None, a positive int or 'node', got {sync_group!r}")
    k = int(sync_group)
    if k < 1 or size % k:
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        raise ValueError(
            f"sync_group={sync_group!r} must be a positive divisor of the number of "
            f"replicas ({size}) so that consecutive groups of {sync_group!r} ranks cover "
            f"them evenly; valid: {divisors}, None (all replicas) or 'node'"
        )
    return k
