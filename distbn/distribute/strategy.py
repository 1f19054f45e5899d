"""The strategy interface, the one-process strategy, scopes and `get_strategy()`.

A strategy owns the communication of data-parallel training: how many replicas there
are, which one this process is, and the few collectives training needs (in-place
all-reduce and broadcast of numpy buffers, a barrier, object helpers, and the batch-norm
statistics all-reduce over the sync group). `LocalStrategy` is one replica and never
touches MPI; `MPIStrategy` (distbn.distribute.mpi) runs them over an MPI communicator.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

from distbn.launchenv import launched_world_size, mpi_world_size_if_initialized

from .buffers import check_buffer, check_op, check_root

__all__ = ["Strategy", "LocalStrategy", "get_strategy"]

# Active scopes, innermost last. Process-wide rather than thread-local: a training
# process has one strategy, and helper threads (data loading, the watchdog) should see
# the one the main thread entered.
_scopes: list = []
_scopes_lock = threading.Lock()
_default = None
_default_lock = threading.Lock()


class Strategy:
    """Base class: the replica layout and the collectives a training step uses.

    Every collective must be called by every replica of its communicator, in the same
    order, with matching buffers (same shape and dtype); names label them for check mode.
    Buffers are updated in place and returned. With one replica nothing communicates.
    """

    @property
    def num_replicas_in_sync(self) -> int:
        """The number of replicas (processes) the strategy spans."""
        raise NotImplementedError

    @property
    def replica_id(self) -> int:
        """This process's replica id, in [0, num_replicas_in_sync)."""
        raise NotImplementedError

    @property
    def sync_group_size(self) -> int:
        """The number of replicas whose batch-norm statistics are combined with this one's."""
        raise NotImplementedError

    @property
    def collective_count(self) -> int:
        """Collectives this strategy has started (its sequence number); one-replica
        short-circuits do not count. A stall watchdog compares it over time."""
        return 0

    @property
    def in_collective(self) -> bool:
        """Whether a collective has started and not returned (for a stall watchdog)."""
        return False

    @property
    def last_collective(self) -> tuple | None:
        """`(sequence number, method, name)` of the last collective started, or None."""
        return None

    @property
    def check(self) -> bool:
        """Whether collectives are compared across replicas before they run (check mode)."""
        return False

    def set_check(self, check: bool) -> None:
        """Switch check mode (collective where it communicates). Strategies without
        collectives to check, like `LocalStrategy`, ignore it.

        Args:
            check: True to check every collective from now on.
        """

    def set_stall_timeout(self, seconds: float | None) -> None:
        """Start or stop the stall watchdog (see `MPIStrategy`). One replica never waits
        for another, so strategies without communication ignore it.

        Args:
            seconds: a positive number of seconds, or None for off.
        """

    @contextlib.contextmanager
    def scope(self):
        """Make this the strategy `get_strategy()` returns inside the `with` block.

        Scopes nest; the innermost active one wins.

        Returns:
            A context manager yielding this strategy.
        """
        with _scopes_lock:
            _scopes.append(self)
        try:
            yield self
        finally:
            with _scopes_lock:
                # Remove this scope's own entry even if scopes were exited out of order.
                for i in range(len(_scopes) - 1, -1, -1):
                    if _scopes[i] is self:
                        del _scopes[i]
                        break

    def all_reduce(self, buf, op: str = "sum", name: str | None = None):
        """Reduce `buf` elementwise over all replicas, in place.

        Args:
            buf: C-contiguous, writeable numpy array of float32, float64 or integers.
            op: "sum", "max" or "min".
            name: a label for check mode and error messages (e.g. a layer name).

        Returns:
            `buf`, now holding the reduction.
        """
        raise NotImplementedError

    def broadcast(self, buf, root: int = 0, name: str | None = None):
        """Overwrite `buf` on every replica with `root`'s `buf`, in place.

        Args:
            buf: C-contiguous, writeable numpy array (same shape and dtype everywhere).
            root: the replica id whose values are sent.
            name: a label for check mode.

        Returns:
            `buf`.
        """
        raise NotImplementedError

    def barrier(self, name: str | None = None) -> None:
        """Wait until every replica has reached this call.

        Args:
            name: a label for check mode.
        """
        raise NotImplementedError

    def allgather_object(self, obj, name: str | None = None) -> list:
        """Gather a picklable object from every replica onto every replica.

        Args:
            obj: any picklable value.
            name: a label for check mode.

        Returns:
            A list indexed by replica id.
        """
        raise NotImplementedError

    def broadcast_object(self, obj, root: int = 0, name: str | None = None):
        """Send a picklable object from `root` to every replica.

        Args:
            obj: the value on `root` (ignored elsewhere).
            root: the replica id that sends.
            name: a label for check mode.

        Returns:
            `root`'s object.
        """
        raise NotImplementedError

    def sync_all_reduce(self, buf, name: str | None = None):
        """Sum `buf` in place over this replica's batch-norm sync group.

        Synchronized BatchNormalization calls it once per forward and once per backward
        pass with a packed float64 buffer, named "<layer>/forward" and "<layer>/backward".
        Other collectives span all replicas.

        Args:
            buf: C-contiguous, writeable numpy array of float32, float64 or integers.
            name: a label for check mode; a name ending in "/forward" marks a forward
                pass's statistics (`DISTBN_FAULT`'s "bn_forward" point fires there).

        Returns:
            `buf`, now holding the group sum.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_replicas_in_sync={self.num_replicas_in_sync}, "
            f"replica_id={self.replica_id}, sync_group_size={self.sync_group_size})"
        )


class LocalStrategy(Strategy):
    """One replica in one process: every collective returns its input; never imports MPI.

    Arguments are still checked, so code that passes a bad buffer fails here exactly as
    it would under MPI.
    """

    @property
    def num_replicas_in_sync(self) -> int:
        return 1

    @property
    def replica_id(self) -> int:
        return 0

    @property
    def sync_group_size(self) -> int:
        return 1

    def all_reduce(self, buf, op: str = "sum", name: str | None = None):
        check_op(op)
        return check_buffer(buf)

    def broadcast(self, buf, root: int = 0, name: str | None = None):
        check_root(root, 1)
        return check_buffer(buf)

    def barrier(self, name: str | None = None) -> None:
        return None

    def allgather_object(self, obj, name: str | None = None) -> list:
        return [obj]

    def broadcast_object(self, obj, root: int = 0, name: str | None = None):
        check_root(root, 1)
        return obj

    def sync_all_reduce(self, buf, name: str | None = None):
        return check_buffer(buf)


def get_strategy() -> Strategy:
    """The strategy in effect: the innermost active `scope()`, else the process default.

    The default is `MPIStrategy()` over COMM_WORLD when the process was launched as one
    of several MPI ranks (judged from the launcher's environment, or from an already
    initialised MPI), else `LocalStrategy()`; it is created once and cached. Creating
    the MPI default is collective: every rank must make its first `get_strategy()` call
    outside a scope at the same point.

    Returns:
        A `Strategy`.
    """
    with _scopes_lock:
        if _scopes:
            return _scopes[-1]
    global _default
    with _default_lock:
        if _default is None:
            _default = _make_default()
        return _default


def _make_default() -> Strategy:
    size = mpi_world_size_if_initialized()
    if size is None:
        launched = launched_world_size()
        if launched <= 1:
            return LocalStrategy()  # a plain `python` run: do not initialise MPI
        from mpi4py import MPI

        size = MPI.COMM_WORLD.Get_size()
        if size == 1:
            warnings.warn(
                f"the launcher's environment says {launched} ranks were started but "
                "MPI.COMM_WORLD has 1: mpi4py is probably built against a different MPI "
                "than the mpiexec used, and every process will train alone",
                RuntimeWarning,
                stacklevel=3,
            )
    if size > 1:
        from .mpi import MPIStrategy

        return MPIStrategy()
    return LocalStrategy()


def _clear_default() -> None:
    """Forget the cached default strategy (for tests); it is not closed."""
    global _default
    with _default_lock:
        _default = None
