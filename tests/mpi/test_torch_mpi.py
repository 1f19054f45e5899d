"""distbn.torch at N ranks: equal to PyTorch's own BatchNorm on the concatenated batch.

Every rank draws the same global batch, runs distbn's SyncBatchNorm on its shard (even,
uneven, or rank 0 empty) and PyTorch's `BatchNorm*d` on the whole batch, in float64.
Outputs and input gradients must match its shard, the summed weight/bias gradients and
the running statistics the reference's, to 1e-10; collectives are counted. The DDP test
trains a small CNN under DistributedDataParallel (gloo, from `init_process_group`) and
compares it with one process on the global batch. All communication happens before
any assertion (see conftest.py).
"""

import datetime

import numpy as np
import pytest
from comm_helpers import counting_comm_class
from mpi4py import MPI
from test_sync_bn_mpi import my_slice

import distbn

torch = pytest.importorskip("torch")
import distbn.torch as dt  # noqa: E402

F64 = torch.float64
C = 3
SPATIAL = {2: (), 3: (4,), 4: (2, 3), 5: (2, 2, 2)}
REFERENCE = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
             5: torch.nn.BatchNorm3d}


def in_layout(t, layout):
    """`t` contiguous, or channels-last in memory (for 3-D: an (N, L, C) transposed)."""
    if layout == "contiguous" or t.dim() == 2:
        return t.contiguous()
    if t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def run(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    out = (y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone())
    module.zero_grad(set_to_none=True)
    return out


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["even", "uneven", "empty"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_equals_torch_batchnorm_on_the_concatenated_batch(comm, kind, layout):
    total, steps = 11, 2
    sl = my_slice(kind, comm, total)
    counting = counting_comm_class()
    strategy = distbn.MPIStrategy(counting(comm))
    gen = torch.Generator().manual_seed(2026)
    results = []  # (what, ours, reference) to compare after all communication
    counts = []
    for ndim in (2, 3, 4, 5):
        for momentum in (0.1, None):
            ours = dt.SyncBatchNorm(C, momentum=momentum, dtype=F64, strategy=strategy)
            ref = REFERENCE[ndim](C, momentum=momentum, dtype=F64)
            state = ref.state_dict()
            state["weight"] = torch.randn(C, generator=gen, dtype=F64) * 0.3 + 1
            state["bias"] = torch.randn(C, generator=gen, dtype=F64) * 0.3
            state["running_mean"] = torch.randn(C, generator=gen, dtype=F64) + 2
            ref.load_state_dict(state)
            ours.load_state_dict(state)
            tag = f"{ndim}d momentum={momentum}"
            for step in range(steps):
                shape = (total, C, *SPATIAL[ndim])
                x = in_layout(torch.randn(*shape, generator=gen, dtype=F64) * 2 + 1.5, layout)
                dy = in_layout(torch.randn(*shape, generator=gen, dtype=F64), layout)
                counting.calls.clear()
                y, dx, gw, gb = run(ours, x[sl], dy[sl])
                counts.append((f"{tag} train", dict(counting.calls)))
                grads = torch.cat([gw, gb]).numpy().copy()
                comm.Allreduce(MPI.IN_PLACE, grads)
                y_ref, dx_ref, gw_ref, gb_ref = run(ref, x, dy)
                results += [(f"{tag} step {step} y", y, y_ref[sl]),
                            (f"{tag} step {step} dx", dx, dx_ref[sl]),
                            (f"{tag} step {step} dx stride", dx.stride() == x[sl].stride(), True),
                            (f"{tag} step {step} grads", grads, torch.cat([gw_ref, gb_ref])),
                            (f"{tag} step {step} running_mean", ours.running_mean,
                             ref.running_mean),
                            (f"{tag} step {step} running_var", ours.running_var,
                             ref.running_var)]
            results.append((f"{tag} num_batches_tracked", ours.num_batches_tracked,
                            ref.num_batches_tracked))
            ours.eval()
            ref.eval()
            counting.calls.clear()
            y, dx, _, _ = run(ours, x[sl], dy[sl])
            counts.append((f"{tag} eval", dict(counting.calls)))
            y_ref, dx_ref, _, _ = run(ref, x, dy)
            results += [(f"{tag} eval y", y, y_ref[sl]), (f"{tag} eval dx", dx, dx_ref[sl])]
    strategy.close()

    for what, got in counts:
        assert got == ({} if what.endswith("eval") else {"Allreduce": 2}), what
    for what, got, want in results:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-10,
                                   err_msg=what)


@pytest.mark.mpi(min_size=2)
def test_sync_group_of_one_makes_no_mpi_call_and_is_local_bn(comm):
    counting = counting_comm_class()
    strategy = distbn.MPIStrategy(counting(comm), sync_group=1)
    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(4, C, 2, 2, generator=gen, dtype=F64)
    dy = torch.randn(4, C, 2, 2, generator=gen, dtype=F64)
    ours = dt.SyncBatchNorm(C, dtype=F64, strategy=strategy)
    ref = torch.nn.BatchNorm2d(C, dtype=F64)
    counting.calls.clear()
    got, want = run(ours, x, dy), run(ref, x, dy)
    calls = dict(counting.calls)
    strategy.close()
    assert calls == {}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    strategy = distbn.MPIStrategy(MPI.COMM_WORLD)
    dt.init_process_group(strategy=strategy, timeout=datetime.timedelta(seconds=60))
    yield strategy
    dist.destroy_process_group()
    strategy.close()


def small_cnn():
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4, momentum=None), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
    ).to(F64)


def train(model, batches, scale, ddp=False):
    """SGD steps; the loss is the sample sum times `scale` (1/N, or world/N under DDP)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") * scale
        loss.backward()
        opt.step()
    return (model.module if ddp else model).state_dict()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind,layout", [("uneven", "contiguous"), ("empty", "channels_last")])
def test_ddp_training_equals_one_process_on_the_global_batch(process_group, comm, kind,
                                                             layout):
    from torch.nn.parallel import DistributedDataParallel

    total, steps = 10, 3
    gen = torch.Generator().manual_seed(11)
    batches = [(in_layout(torch.randn(total, 3, 6, 6, generator=gen, dtype=F64) + 0.5, layout),
                torch.randint(0, 3, (total,), generator=gen)) for _ in range(steps)]
    sl = my_slice(kind, comm, total)
    counting = counting_comm_class()
    strategy = distbn.MPIStrategy(counting(comm))
    model = dt.convert_sync_batchnorm(small_cnn(), strategy=strategy)
    ddp = DistributedDataParallel(model)
    counting.calls.clear()
    got = train(ddp, [(x[sl], y[sl]) for x, y in batches], comm.size / total, ddp=True)
    calls = dict(counting.calls)
    strategy.close()
    want = train(small_cnn(), batches, 1.0 / total)

    assert calls == {"Allreduce": 2 * 2 * steps}  # 2 BN layers, forward and backward
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-8, msg=key)


@pytest.mark.mpi(min_size=2)
def test_bench_measure_sync_records_agree_on_every_rank(comm):
    from distbn.torch.bench import measure_sync

    records = measure_sync(shape=(2, 3, 4, 4), samples=2, calls=1, warmup=1, comm=comm)
    every = comm.allgather([(r["value"], r["params"]["layout"]) for r in records])
    assert all(e == every[0] for e in every)
    assert [r["world_size"] for r in records] == [comm.size] * 2
    assert all(r["value"] > 0 for r in records)


@pytest.mark.mpi(min_size=2)
def test_bench_resnet_step_record_agrees_on_every_rank(comm):
    from distbn.torch.bench import measure_resnet_step

    records = measure_resnet_step(global_batch=2 * comm.size, samples=1, steps=1, warmup=1,
                                  comm=comm, breakdown=True)
    every = comm.allgather([(r["name"], r["value"], r["params"]["no_bn_ratio"])
                            for r in records])
    assert all(e == every[0] for e in every)
    assert len(records) == 1 and records[0]["world_size"] == comm.size
    params = records[0]["params"]
    assert records[0]["value"] > 0 and params["sync_ms"] > 0
    for name in ("distbn_local", "no_bn"):
        assert params[f"{name}_ms"] > 0 and params[f"{name}_ratio"] > 0
    # 18 BN all-reduces a step, timed: more than nothing, less than the whole step
    assert 0 < params["sync_collectives_ms"] < params["sync_ms"]
