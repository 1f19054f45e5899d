"""MPIStrategy at several ranks (run by tests/test_mpi_suite.py at 2 and 3 ranks).

Every rank reaches the same collectives, then asserts; expected values are computed
from the rank numbers, so the tests hold at any size.
"""

import numpy as np
import pytest
from comm_helpers import counting_comm_class
from mpi4py import MPI

import distbn
from distbn.distribute import strategy as strategy_mod
from distbn.distribute.abort import abort_hook_installed
from distbn.distribute.mpi import _adopt


@pytest.fixture
def make(comm):
    """Create strategies on this test's communicator; all are closed (collectively) after."""
    made = []

    def _make(on=None, **kwargs):
        s = distbn.MPIStrategy(comm if on is None else on, **kwargs)
        made.append(s)
        return s

    yield _make
    for s in reversed(made):
        s.close()


@pytest.mark.mpi
def test_layout(make, comm):
    s = make()
    assert isinstance(s, distbn.Strategy)
    assert s.num_replicas_in_sync == comm.size and s.replica_id == comm.rank
    assert s.sync_group_size == comm.size and s.sync_group is None
    assert s.comm != comm and MPI.Comm.Compare(s.comm, comm) == MPI.CONGRUENT
    assert f"replica_id={comm.rank}" in repr(s)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64, np.int32])
def test_all_reduce_sum_max_min(make, comm, dtype):
    s = make()
    size, rank = comm.size, comm.rank
    base = np.arange(6, dtype=dtype).reshape(2, 3)
    ranks = np.arange(size)
    for op, want in (
        ("sum", base * size + ranks.sum()),
        ("max", base + ranks.max()),
        ("min", base + ranks.min()),
    ):
        buf = base + dtype(rank)
        out = s.all_reduce(buf, op=op, name=f"t_{op}")
        assert out is buf and buf.dtype == dtype
        np.testing.assert_array_equal(buf, want.astype(dtype))


@pytest.mark.mpi
def test_broadcast_from_each_root(make, comm):
    s = make()
    for root in range(comm.size):
        buf = np.full((2, 2), 10.0 * comm.rank + 1)
        ibuf = np.full(3, comm.rank, dtype=np.int32)
        assert s.broadcast(buf, root=root) is buf
        s.broadcast(ibuf, root=root)
        np.testing.assert_array_equal(buf, np.full((2, 2), 10.0 * root + 1))
        np.testing.assert_array_equal(ibuf, np.full(3, root, dtype=np.int32))


@pytest.mark.mpi
def test_object_helpers_and_barrier(make, comm):
    s = make()
    got = s.allgather_object({"rank": comm.rank, "sq": comm.rank**2})
    assert got == [{"rank": r, "sq": r**2} for r in range(comm.size)]
    for root in range(comm.size):
        assert s.broadcast_object(("from", comm.rank), root=root) == ("from", root)
    s.barrier(name="sync point")


@pytest.mark.mpi
def test_sync_groups_of_k(make, comm):
    size, rank = comm.size, comm.rank
    for k in range(1, size + 2):
        if size % k:
            # Checked locally before any communication: every rank raises the same error.
            with pytest.raises(ValueError, match=rf"sync_group={k} .*replicas \({size}\)"):
                make(sync_group=k)
            continue
        s = make(sync_group=k)
        assert s.sync_group_size == k and s.sync_group == k
        group = range(rank // k * k, rank // k * k + k)
        buf = np.array([rank + 1.0, 1.0])
        assert s.sync_all_reduce(buf, name="bn") is buf
        np.testing.assert_array_equal(buf, [sum(r + 1.0 for r in group), k])
        grad = np.array([rank + 1.0])  # gradients span all replicas whatever the group
        s.all_reduce(grad)
        np.testing.assert_array_equal(grad, [size * (size + 1) / 2])


@pytest.mark.mpi
def test_sync_group_node(make, comm):
    s = make(sync_group="node")
    hosts = comm.allgather(MPI.Get_processor_name())
    mine = [r for r, h in enumerate(hosts) if h == hosts[comm.rank]]
    assert s.sync_group_size == len(mine)
    buf = np.array([float(comm.rank)])
    s.sync_all_reduce(buf)
    np.testing.assert_array_equal(buf, [float(sum(mine))])


@pytest.mark.mpi(min_size=2)
def test_every_allreduce_goes_through_a_subclass(make, comm):
    Counting = counting_comm_class()
    for group in (None, comm.size, "node"):
        s = make(Counting(comm), sync_group=group)
        assert type(s.comm) is Counting  # mpi4py 4: Dup keeps the subclass
        before = Counting.calls["Allreduce"]
        buf = np.zeros(5)
        for _ in range(4):
            s.sync_all_reduce(buf, name="bn")
        assert Counting.calls["Allreduce"] - before == 4
        s.all_reduce(buf)
        assert Counting.calls["Allreduce"] - before == 5
    # A one-rank group communicates not at all.
    s = make(Counting(comm), sync_group=1)
    before = sum(Counting.calls.values())
    s.sync_all_reduce(np.ones(3))
    assert sum(Counting.calls.values()) == before


@pytest.mark.mpi(min_size=2)
def test_split_groups_keep_the_subclass(comm):
    # Split returns a plain Intracomm; the strategy re-wraps it so a subclass sees group
    # traffic too (sync_group=k with 1 < k < size, e.g. 2 of 4 ranks, takes this path).
    Counting = counting_comm_class()
    sub = Counting(comm).Split(comm.rank % 2, comm.rank)
    assert type(sub) is MPI.Intracomm
    wrapped = _adopt(sub, Counting)
    assert type(wrapped) is Counting and wrapped.size == sub.size
    buf = np.ones(2)
    wrapped.Allreduce(MPI.IN_PLACE, buf)
    assert Counting.calls["Allreduce"] == 1 and buf[0] == sub.size
    wrapped.Free()


@pytest.mark.mpi(min_size=2)
def test_check_mode_catches_a_shape_mismatch_on_every_rank(make, comm):
    Counting = counting_comm_class()
    s = make(Counting(comm), check=True)
    before = Counting.calls["Allreduce"]
    buf = np.zeros(comm.rank + 1)  # every rank a different length
    with pytest.raises(distbn.CollectiveMismatchError) as info:
        s.sync_all_reduce(buf, name="bn_3")
    msg = str(info.value)
    assert "differing: shape" in msg
    for r in range(comm.size):
        assert f"replica {r} called #1 sync_all_reduce(op='sum', shape=({r + 1},)" in msg
    assert "name='bn_3'" in msg
    assert sorted(info.value.descriptors) == list(range(comm.size))
    assert Counting.calls["Allreduce"] == before  # nothing was reduced
    assert not s.in_collective
    # The ranks stay in step: the next matched collective works (and is counted once).
    ok = np.ones(2)
    s.sync_all_reduce(ok, name="bn_3")
    np.testing.assert_array_equal(ok, [comm.size] * 2)
    assert Counting.calls["Allreduce"] == before + 1


@pytest.mark.mpi(min_size=2)
def test_check_mode_catches_other_mismatches(make, comm):
    s = make(check=True)
    rank = comm.rank
    cases = [
        # rank 0 broadcasts while the others all-reduce: a hang without check mode
        (lambda: s.broadcast(np.ones(2)) if rank == 0 else s.all_reduce(np.ones(2)),
         ["broadcast(", "all_reduce(", "differing: kind"]),
        (lambda: s.all_reduce(np.ones(2), op="max" if rank == 0 else "sum"),
         ["op='max'", "op='sum'"]),
        (lambda: s.all_reduce(np.ones(2, np.float32 if rank == 0 else np.float64)),
         ["dtype=float32", "dtype=float64", "differing: dtype"]),
        (lambda: s.sync_all_reduce(np.ones(2), name=f"bn_{min(rank, 1)}"),
         ["name='bn_0'", "name='bn_1'"]),
        (lambda: s.broadcast_object("x", root=min(rank, 1)), ["root=0", "root=1"]),
    ]
    for call, needles in cases:
        with pytest.raises(distbn.CollectiveMismatchError) as info:
            call()
        for needle in needles:
            assert needle in str(info.value)


@pytest.mark.mpi(min_size=2)
def test_check_mode_from_env_and_from_any_rank(make, comm, monkeypatch):
    monkeypatch.setenv("DISTBN_CHECK_COLLECTIVES", "1")
    s = make()
    assert s.check
    buf = np.ones(3)
    s.all_reduce(buf, name="same")
    np.testing.assert_array_equal(buf, [comm.size] * 3)
    monkeypatch.delenv("DISTBN_CHECK_COLLECTIVES")
    # Asked for on rank 0 only: every rank checks, or the extra allgather would hang.
    s = make(check=comm.rank == 0)
    assert s.check
    with pytest.raises(distbn.CollectiveMismatchError):
        s.all_reduce(np.ones(comm.rank + 1))


@pytest.mark.mpi(min_size=2)
def test_sync_group_must_agree_across_ranks(make, comm):
    with pytest.raises(ValueError, match="sync_group must be the same on every rank.*rank 1: 1"):
        make(sync_group=None if comm.rank == 0 else 1)


@pytest.mark.mpi
def test_bad_arguments_raise_before_communicating(make, comm):
    s = make()
    with pytest.raises(ValueError, match="got 'mean'"):
        s.all_reduce(np.ones(2), op="mean")
    with pytest.raises(ValueError, match=f"root must be in \\[0, {comm.size}\\).*got {comm.size}"):
        s.broadcast(np.ones(2), root=comm.size)
    with pytest.raises(TypeError, match="'float16'"):
        s.sync_all_reduce(np.ones(2, np.float16))
    assert s.collective_count == 0


@pytest.mark.mpi
def test_collective_counter(make, comm):
    s = make()
    assert (s.collective_count, s.in_collective, s.last_collective) == (0, False, None)
    s.all_reduce(np.ones(1))
    s.sync_all_reduce(np.ones(1), name="bn")
    s.broadcast(np.ones(1))
    s.barrier()
    s.allgather_object(1)
    s.broadcast_object(1, name="cfg")
    assert s.collective_count == 6 and not s.in_collective
    assert s.last_collective == (6, "broadcast_object", "cfg")


@pytest.mark.mpi(min_size=2)
def test_default_strategy_and_scopes(comm, monkeypatch):
    monkeypatch.setattr(strategy_mod, "_default", None)
    default = distbn.get_strategy()  # collective: a Dup of COMM_WORLD
    try:
        assert type(default) is distbn.MPIStrategy
        assert default.num_replicas_in_sync == MPI.COMM_WORLD.size
        assert default.replica_id == MPI.COMM_WORLD.rank
        assert distbn.get_strategy() is default
        local = distbn.LocalStrategy()
        with local.scope():
            assert distbn.get_strategy() is local
        assert distbn.get_strategy() is default
        assert abort_hook_installed()  # a multi-rank strategy arms the abort hook
    finally:
        default.close()


@pytest.mark.mpi(min_size=2)
def test_closed_strategy_raises(comm):
    s = distbn.MPIStrategy(comm)
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.all_reduce(np.ones(2))
    with pytest.raises(RuntimeError, match="closed"):
        s.sync_all_reduce(np.ones(2))
