"""Strategy tests in one process: LocalStrategy, MPIStrategy on COMM_SELF, scopes,
launcher detection and argument errors. The multi-rank behaviour is in
tests/mpi/test_strategy_mpi.py; the abort path in tests/test_abort.py."""

import collections
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import distbn
from distbn.distribute import check as check_mod
from distbn.distribute import strategy as strategy_mod
from distbn.distribute.abort import format_rank_traceback
from distbn.distribute.check import CollectiveMismatchError, Descriptor, check_from_env, verify
from distbn.distribute.launch import launched_world_size
from distbn.mpiexec import mpiexec_command, rank_env

REPO = Path(__file__).resolve().parent.parent

# Variables that would make a child process think it is one of several MPI ranks.
LAUNCH_VARS = (
    "PMI_SIZE", "PMI_RANK", "PMI_FD", "PMIX_RANK", "PMIX_NAMESPACE", "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
    "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "DISTBN_CHECK_COLLECTIVES",
)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(extra)
    return env


def run_python(code, env, timeout=60):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def counting_comm_class():
    """A fresh Intracomm subclass counting every communication method called on it."""
    from mpi4py import MPI

    class CountingComm(MPI.Intracomm):
        calls = collections.Counter()  # class-level: Dup makes instances without __init__

    for meth in ("Allreduce", "Bcast", "Barrier", "allgather", "allreduce", "bcast",
                 "Dup", "Split", "Split_type"):
        def counted(self, *args, _meth=meth, **kwargs):
            CountingComm.calls[_meth] += 1
            return getattr(MPI.Intracomm, _meth)(self, *args, **kwargs)

        setattr(CountingComm, meth, counted)
    return CountingComm


@pytest.fixture(autouse=True)
def _no_leftover_scopes():
    yield
    assert strategy_mod._scopes == [], "a test left a strategy scope active"


# -- LocalStrategy -------------------------------------------------------------------


def test_local_strategy_layout():
    s = distbn.LocalStrategy()
    assert isinstance(s, distbn.Strategy)
    assert (s.num_replicas_in_sync, s.replica_id, s.sync_group_size) == (1, 0, 1)
    assert s.collective_count == 0 and not s.in_collective and s.last_collective is None
    assert "LocalStrategy(num_replicas_in_sync=1" in repr(s)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64, np.uint8])
def test_local_strategy_ops_are_identity(dtype):
    s = distbn.LocalStrategy()
    buf = np.arange(6, dtype=dtype).reshape(2, 3)
    want = buf.copy()
    for op in ("sum", "max", "min"):
        assert s.all_reduce(buf, op=op, name="x") is buf
    assert s.broadcast(buf, root=0) is buf
    assert s.sync_all_reduce(buf, name="bn") is buf
    np.testing.assert_array_equal(buf, want)
    assert s.barrier() is None
    obj = {"a": [1, 2]}
    assert s.allgather_object(obj) == [obj]
    assert s.broadcast_object(obj) is obj


def test_local_strategy_never_imports_mpi4py():
    code = """
        import sys
        import numpy as np
        import distbn
        s = distbn.LocalStrategy()
        b = np.ones(3)
        s.all_reduce(b); s.sync_all_reduce(b); s.broadcast(b); s.barrier()
        s.allgather_object(1); s.broadcast_object(2)
        d = distbn.get_strategy()
        assert type(d) is distbn.LocalStrategy, d
        with s.scope():
            assert distbn.get_strategy() is s
        assert 'mpi4py' not in sys.modules, sorted(m for m in sys.modules if 'mpi' in m)
        print('OK')
    """
    # SLURM_NTASKS alone is an sbatch allocation, not a launched step: still local.
    for env in (clean_env(), clean_env(SLURM_NTASKS="4")):
        proc = run_python(code, env)
        assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr


# -- argument checks (the same for every strategy) ----------------------------------


def strategies():
    from mpi4py import MPI

    return [distbn.LocalStrategy(), distbn.MPIStrategy(comm=MPI.COMM_SELF)]


@pytest.mark.parametrize("which", [0, 1], ids=["local", "mpi_self"])
def test_buffer_errors_quote_the_value(which):
    s = strategies()[which]
    bad = [
        ([1.0, 2.0], TypeError, "got list"),
        (np.ones(3, np.float16), TypeError, "'float16'"),
        (np.ones(3, bool), TypeError, "'bool'"),
        (np.ones(3, np.complex128), TypeError, "'complex128'"),
        (np.ones((3, 4))[:, ::2], ValueError, r"C-contiguous.*shape \(3, 2\)"),
        (np.ones((3, 4)).T, ValueError, "C-contiguous"),
        (np.ones(3, ">f8"), ValueError, "native byte order.*'>f8'"),
    ]
    ro = np.ones(3)
    ro.setflags(write=False)
    bad.append((ro, ValueError, "read-only"))
    for buf, exc, match in bad:
        for call in (s.all_reduce, s.sync_all_reduce, s.broadcast):
            with pytest.raises(exc, match=match):
                call(buf)


@pytest.mark.parametrize("which", [0, 1], ids=["local", "mpi_self"])
def test_op_and_root_errors_quote_the_value(which):
    s = strategies()[which]
    buf = np.ones(2)
    for op in ("avg", "SUM", None, "mean"):
        with pytest.raises(ValueError, match=f"op must be one of .*got {op!r}"):
            s.all_reduce(buf, op=op)
    for root, exc in ((1, ValueError), (-1, ValueError), (True, TypeError), (0.0, TypeError)):
        with pytest.raises(exc, match=f"got {root!r}"):
            s.broadcast(buf, root=root)
        with pytest.raises(exc, match=f"got {root!r}"):
            s.broadcast_object("x", root=root)
    assert s.broadcast(buf, root=np.int64(0)) is buf


# -- MPIStrategy at one rank ---------------------------------------------------------


def test_mpi_strategy_on_comm_self_makes_no_mpi_call():
    Counting = counting_comm_class()
    from mpi4py import MPI

    s = distbn.MPIStrategy(comm=Counting(MPI.COMM_SELF), sync_group=1, check=True)
    assert (s.num_replicas_in_sync, s.replica_id, s.sync_group_size) == (1, 0, 1)
    buf = np.arange(4.0)
    assert s.all_reduce(buf, op="max") is buf
    assert s.sync_all_reduce(buf, name="bn") is buf
    assert s.broadcast(buf) is buf
    s.barrier()
    assert s.allgather_object("a") == ["a"]
    assert s.broadcast_object("b") == "b"
    np.testing.assert_array_equal(buf, np.arange(4.0))
    assert s.collective_count == 0
    s.close()
    s.close()  # idempotent
    assert sum(Counting.calls.values()) == 0, Counting.calls


def test_mpi_strategy_default_sync_group_on_self():
    from mpi4py import MPI

    for group in (None, 1, "node"):
        s = distbn.MPIStrategy(comm=MPI.COMM_SELF, sync_group=group)
        assert s.sync_group == group and s.sync_group_size == 1
        assert s.comm is MPI.COMM_SELF  # one rank: no duplicate is made


@pytest.mark.parametrize(
    "group, exc, match",
    [
        (2, ValueError, r"sync_group=2 must be a positive divisor of the number of replicas \(1\)"),
        (0, ValueError, "sync_group=0"),
        (-1, ValueError, "sync_group=-1"),
        ("nodes", ValueError, "got 'nodes'"),
        ("", ValueError, "got ''"),
        (True, TypeError, "got True"),
        (1.0, TypeError, "got 1.0"),
        ([1], TypeError, r"got \[1\]"),
    ],
)
def test_bad_sync_group(group, exc, match):
    from mpi4py import MPI

    with pytest.raises(exc, match=match):
        distbn.MPIStrategy(comm=MPI.COMM_SELF, sync_group=group)


def test_bad_comm_and_check():
    from mpi4py import MPI

    with pytest.raises(TypeError, match="comm must be an mpi4py MPI.Intracomm, got 'world'"):
        distbn.MPIStrategy(comm="world")
    with pytest.raises(ValueError, match="COMM_NULL"):
        distbn.MPIStrategy(comm=MPI.COMM_NULL)
    with pytest.raises(TypeError, match="check must be True, False or None, got 'yes'"):
        distbn.MPIStrategy(comm=MPI.COMM_SELF, check="yes")


def test_check_flag_from_env(monkeypatch):
    from mpi4py import MPI

    for value, want in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False)):
        monkeypatch.setenv("DISTBN_CHECK_COLLECTIVES", value)
        assert check_from_env() is want
        assert distbn.MPIStrategy(comm=MPI.COMM_SELF).check is want
    assert distbn.MPIStrategy(comm=MPI.COMM_SELF, check=False).check is False
    monkeypatch.setenv("DISTBN_CHECK_COLLECTIVES", "maybe")
    with pytest.raises(ValueError, match=r"DISTBN_CHECK_COLLECTIVES.*got 'maybe'"):
        distbn.MPIStrategy(comm=MPI.COMM_SELF)
    monkeypatch.delenv("DISTBN_CHECK_COLLECTIVES")
    assert check_from_env() is False


# -- scopes and get_strategy ---------------------------------------------------------


def test_scopes_nest_and_innermost_wins(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(strategy_mod, "_default", None)
    default = distbn.get_strategy()
    assert type(default) is distbn.LocalStrategy
    assert distbn.get_strategy() is default  # cached
    a, b = distbn.LocalStrategy(), distbn.LocalStrategy()
    with a.scope() as entered:
        assert entered is a and distbn.get_strategy() is a
        with b.scope():
            assert distbn.get_strategy() is b
            with a.scope():  # re-entering the same strategy nests too
                assert distbn.get_strategy() is a
            assert distbn.get_strategy() is b
        assert distbn.get_strategy() is a
    assert distbn.get_strategy() is default


def test_scope_exit_after_exception_and_out_of_order():
    a, b = distbn.LocalStrategy(), distbn.LocalStrategy()
    with pytest.raises(KeyError), a.scope():
        raise KeyError("x")
    assert strategy_mod._scopes == []
    sa, sb = a.scope(), b.scope()
    sa.__enter__()
    sb.__enter__()
    sa.__exit__(None, None, None)  # the outer one leaves first: b stays active
    assert distbn.get_strategy() is b
    sb.__exit__(None, None, None)


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, 1),
        ({"PMI_SIZE": "4", "PMI_RANK": "0"}, 4),
        ({"PMI_SIZE": "1", "PMI_RANK": "0", "SLURM_NTASKS": "8"}, 1),
        ({"OMPI_COMM_WORLD_SIZE": "3"}, 3),
        ({"MV2_COMM_WORLD_SIZE": "2"}, 2),
        ({"MPI_LOCALNRANKS": "2"}, 2),
        ({"SLURM_NTASKS": "4"}, 1),  # an sbatch script outside srun
        ({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, 1),
        ({"SLURM_NTASKS": "4", "PMIX_RANK": "0"}, 4),  # srun --mpi=pmix
        ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2", "PMIX_RANK": "0"}, 2),
        ({"PMI_SIZE": "junk"}, 1),
    ],
)
def test_launched_world_size(env, want):
    assert launched_world_size(env) == want


def test_default_strategy_under_plain_mpiexec():
    """`mpiexec -n 2 python script.py` (no -m mpi4py): get_strategy() spans both ranks;
    `mpiexec -n 1`: local, and mpi4py is never imported."""
    code = (
        "import sys, distbn; s = distbn.get_strategy(); "
        "sys.stdout.write(f'RESULT {type(s).__name__} {s.num_replicas_in_sync} "
        "{s.replica_id} {\"mpi4py\" in sys.modules}\\n'); sys.stdout.flush()"
    )
    for n, want in ((2, {"MPIStrategy 2 0 True", "MPIStrategy 2 1 True"}),
                    (1, {"LocalStrategy 1 0 False"})):
        cmd = mpiexec_command(n, [sys.executable, "-c", code])
        proc = subprocess.run(cmd, cwd=REPO, env=rank_env(clean_env()),
                              capture_output=True, text=True, timeout=60)
        got = {ln.split(" ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("RESULT")}
        assert proc.returncode == 0 and got == want, (proc.stdout, proc.stderr)


# -- check-mode and abort helpers ----------------------------------------------------


class FakeComm:
    """Stands in for a check communicator: allgather returns canned per-rank values."""

    def __init__(self, others):
        self.others = others

    def allgather(self, mine):
        return [mine, *self.others]


def test_verify_passes_equal_descriptors_and_names_both_sides():
    d = Descriptor(3, "sync_all_reduce", "sum", (6,), "float64", None, "bn")
    verify(FakeComm([(1, d), (2, d)]), 0, d)
    other = Descriptor(3, "sync_all_reduce", "sum", (7,), "float64", None, "bn")
    with pytest.raises(CollectiveMismatchError) as info:
        verify(FakeComm([(1, other), (2, d)]), 0, d)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "differing: shape" in msg
    assert "replicas 0, 2 called #3 sync_all_reduce(op='sum', shape=(6,)" in msg
    assert "replica 1 called #3 sync_all_reduce(op='sum', shape=(7,)" in msg
    assert info.value.descriptors == {0: d, 1: other, 2: d}


def test_descriptor_text():
    assert str(Descriptor(1, "broadcast", root=2, shape=(3,), dtype="int64")) == (
        "#1 broadcast(shape=(3,), dtype=int64, root=2, name=None)"
    )
    assert check_mod.CHECK_ENV_VAR == "DISTBN_CHECK_COLLECTIVES"


def test_rank_prefixed_traceback():
    try:
        raise ValueError("bad\nsecond line")
    except ValueError as exc:
        text = format_rank_traceback(3, type(exc), exc, exc.__traceback__)
    lines = text.splitlines()
    assert lines[0] == "[rank 3] Traceback (most recent call last):"
    assert all(ln.startswith("[rank 3] ") for ln in lines)
    assert "[rank 3] ValueError: bad" in lines and "[rank 3] second line" in lines
