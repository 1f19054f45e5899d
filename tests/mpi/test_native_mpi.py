"""`distbn.distribute.native`: the sync-group sum compiled code calls (the Keras JAX
path's XLA FFI handlers), from several threads at once as XLA's do."""

import threading

import numpy as np
import pytest

import distbn
from distbn.distribute.native import channel_descriptor, native_available, sync_sum


@pytest.mark.mpi(min_size=2)
def test_sums_over_the_group_and_keeps_the_strategys_books(comm):
    strategy = distbn.MPIStrategy(comm)
    fn = sync_sum()
    rank, size = comm.rank, comm.size
    start = strategy.collective_count
    results = []
    for i in range(200):
        desc = channel_descriptor(strategy, f"layer{i % 7}")
        results.append(fn(desc, np.full(2 + i % 5, rank + i, dtype=np.float64)))
    count, last, inside = strategy.collective_count - start, strategy.last_collective, \
        strategy.in_collective
    available = native_available(strategy)
    strategy.close()
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got, np.full(2 + i % 5, size * i + size * (size - 1) / 2))
    assert count == 200 and not inside and available
    assert last == (start + 200, "sync_all_reduce", "layer3")  # 199 % 7


@pytest.mark.mpi(min_size=2)
def test_python_collectives_on_other_threads_meanwhile(comm):
    # XLA runs the handlers on its threads while Python collectives run on others: the
    # compiled sums have their own communicator, and their buffers survive the call.
    strategy = distbn.MPIStrategy(comm)
    fn = sync_sum()
    desc = channel_descriptor(strategy, "bn")
    size = comm.size
    bad = []

    def native():
        for i in range(2000):
            got = fn(desc, np.full(9, float(i)))
            if not np.all(got == size * i):
                bad.append(i)

    worker = threading.Thread(target=native)
    worker.start()
    for _ in range(300):
        strategy.all_reduce(np.ones(64))
    worker.join()
    strategy.close()
    assert bad == []


@pytest.mark.mpi(min_size=2)
def test_check_mode_has_no_native_form(comm):
    strategy = distbn.MPIStrategy(comm, check=True)
    available = native_available(strategy)
    strategy.close()
    assert not available
