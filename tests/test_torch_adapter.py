"""distbn.torch at one process: parity with torch.nn.BatchNorm*d, gradients, convert/revert.

The reference is PyTorch's own BatchNorm on the same input (float64, to rounding).
A "mirror" strategy (every replica holds the same shard: the sum over 2 replicas is
twice the local buffer) runs the synchronized code path without MPI: it must equal
PyTorch on the batch concatenated with itself. The N-rank checks are in
tests/mpi/test_torch_mpi.py.
"""

import copy
import io
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import distbn  # noqa: E402
import distbn.torch as dt  # noqa: E402

F64 = torch.float64
# (shape, memory format): 2-D to 5-D, contiguous and channels-last layouts.
CASES = [
    ((7, 3), None),
    ((5, 3, 4), None),
    ((5, 3, 4), "transposed"),  # an (N, L, C) tensor seen as (N, C, L)
    ((4, 3, 3, 5), None),
    ((4, 3, 3, 5), torch.channels_last),
    ((3, 3, 2, 3, 4), None),
    ((3, 3, 2, 3, 4), torch.channels_last_3d),
]
IDS = [f"{len(s)}d-{str(f).replace('torch.', '') if f else 'contiguous'}" for s, f in CASES]


def layout(t, fmt):
    if fmt is None:
        return t.contiguous()
    if fmt == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous(memory_format=fmt)


class CountingStrategy(distbn.LocalStrategy):
    """A sync group of `replicas` whose sum is `factor` times the local buffer (factor =
    replicas: identical replicas; 1: the others are empty). Counts its all-reduces."""

    def __init__(self, replicas=2, factor=None):
        self.replicas = replicas
        self.factor = replicas if factor is None else factor
        self.calls = []

    @property
    def sync_group_size(self):
        return self.replicas

    def sync_all_reduce(self, buf, name=None):
        self.calls.append(name)
        buf *= self.factor
        return buf


def reference(ndim, **kwargs):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[ndim]
    return cls(3, **kwargs)


def pair(ndim, dtype=F64, strategy=None, seed=0, **kwargs):
    """A distbn module and PyTorch's with the same random weights and running stats."""
    ours = dt.SyncBatchNorm(3, dtype=dtype, strategy=strategy or distbn.LocalStrategy(),
                            **kwargs)
    theirs = reference(ndim, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in theirs.state_dict().items()}
    for key in ("weight", "bias", "running_mean"):
        if key in state:
            state[key] = torch.randn(3, generator=gen, dtype=dtype) * 0.3 + 0.5
    if "running_var" in state:
        state["running_var"] = torch.rand(3, generator=gen, dtype=dtype) + 0.5
    theirs.load_state_dict(state)
    ours.load_state_dict(state)
    return ours, theirs


def step(module, x, dy):
    """Forward+backward; returns output, input grad, weight/bias grads (None if absent)."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    grads = [None if p is None else p.grad.clone() for p in (module.weight, module.bias)]
    module.zero_grad(set_to_none=True)
    return y, x.grad, grads


def assert_same_state(a, b, atol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(params=["numba", "numpy"])
def kernels_backend(request, monkeypatch):
    """Both adapter paths: numba's kernels take the prepared one (distbn.ops.step), the
    numpy reference the general one (distbn.ops' functions)."""
    import distbn.ops as ops

    if request.param == "numba" and ops.backend_name() != "numba":
        pytest.skip("numba kernels not active")
    if request.param == "numpy":
        monkeypatch.setattr(ops.backend, "_state", dict(ops.backend._state))
        ops.set_backend("numpy")
    return request.param


@pytest.mark.parametrize("shape,fmt", CASES, ids=IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_torch_batchnorm_float64(shape, fmt, momentum, kernels_backend):
    ours, theirs = pair(len(shape), momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = layout(torch.randn(*shape, generator=gen, dtype=F64) * 2 + 1.5, fmt)
        dy = layout(torch.randn(*shape, generator=gen, dtype=F64), fmt)
        y, dx, g = step(ours, x, dy)
        y_ref, dx_ref, g_ref = step(theirs, x, dy)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref, rtol=0, atol=1e-12)
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert y.stride() == x.stride()  # the layout is kept (torch too, but for (N, L, C))
        assert y.stride() == y_ref.stride() or fmt == "transposed"
        assert_same_state(ours, theirs, 1e-12)
    ours.eval()
    theirs.eval()
    x = layout(torch.randn(*shape, generator=gen, dtype=F64), fmt)
    dy = layout(torch.randn(*shape, generator=gen, dtype=F64), fmt)
    for a, b in zip(step(ours, x, dy)[:2], step(theirs, x, dy)[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("loss", ["sum", "square"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_strided_input_and_expanded_output_gradient(fmt, loss, kernels_backend):
    """Tensors with no C-contiguous order are copied, not misread: a sliced input, and
    the stride-0 output gradient that `y.sum()` sends back."""
    ours, theirs = pair(4)
    base = layout(torch.randn(4, 3, 6, 10, dtype=F64) * 2 + 1.5, fmt)
    results = []
    for module in (ours, theirs):
        x = base.detach().requires_grad_(True)
        y = module(x[:, :, 1::2, ::3])
        y.register_hook(lambda g: results.append(g.stride()))
        (y.sum() if loss == "sum" else (y * y).sum()).backward()
        results.append((y, x.grad, module.weight.grad, module.bias.grad))
    if loss == "sum":
        assert 0 in results[0]  # the gradient reaching the module is expanded
    for a, b in zip(results[1], results[3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert_same_state(ours, theirs, 1e-12)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_affine_and_track_running_stats_options(affine, track):
    ours, theirs = pair(4, affine=affine, track_running_stats=track)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 2, 3, generator=gen, dtype=F64)
    dy = torch.randn(4, 3, 2, 3, generator=gen, dtype=F64)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        (y, dx, g), (y_ref, dx_ref, g_ref) = step(ours, x, dy), step(theirs, x, dy)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref, rtol=0, atol=1e-12)
        assert all((a is None) == (b is None) for a, b in zip(g, g_ref, strict=True))
        assert_same_state(ours, theirs, 1e-12)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_float32_matches_torch(fmt):
    ours, theirs = pair(4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    x = layout(torch.randn(8, 3, 6, 5, generator=gen) * 3 + 2, fmt)
    dy = layout(torch.randn(8, 3, 6, 5, generator=gen), fmt)
    (y, dx, g), (y_ref, dx_ref, g_ref) = step(ours, x, dy), step(theirs, x, dy)
    assert y.dtype == dx.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert_same_state(ours, theirs, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32_returned_in_their_dtype(dtype):
    ours, theirs = pair(4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 3, 4, 4, generator=gen) + 1).to(dtype)
    dy = torch.randn(6, 3, 4, 4, generator=gen).to(dtype)
    y, dx, g = step(ours, x, dy)
    y_ref, dx_ref, g_ref = step(theirs, x.float(), dy.float())  # float32 on the same values
    assert y.dtype == dx.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.to(dtype).float(), rtol=0, atol=0)
    torch.testing.assert_close(dx.float(), dx_ref.to(dtype).float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g, g_ref, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(fmt, training):
    bn = dt.SyncBatchNorm(2, dtype=F64, strategy=distbn.LocalStrategy())
    bn.train(training)
    gen = torch.Generator().manual_seed(5)
    x = layout(torch.randn(3, 2, 2, 3, generator=gen, dtype=F64), fmt).requires_grad_(True)
    w = (torch.rand(2, generator=gen, dtype=F64) + 0.5).requires_grad_(True)
    b = torch.randn(2, generator=gen, dtype=F64).requires_grad_(True)

    def f(x, w, b):
        return dt.sync_batch_norm(x, bn.running_mean, bn.running_var, w, b, training=training,
                                  momentum=None, eps=1e-3)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)


def test_mirror_strategy_runs_the_synchronized_path_with_one_collective_each_way(
        kernels_backend):
    """Two identical replicas: statistics of the batch concatenated with itself."""
    strat = CountingStrategy(2)
    ours, theirs = pair(4, strategy=strat, momentum=None)
    gen = torch.Generator().manual_seed(6)
    for fmt in (None, torch.channels_last):
        x = layout(torch.randn(3, 3, 2, 2, generator=gen, dtype=F64) - 4, fmt)
        dy = layout(torch.randn(3, 3, 2, 2, generator=gen, dtype=F64), fmt)
        strat.calls.clear()
        y, dx, g = step(ours, x, dy)
        assert strat.calls == [f"{ours._label}/forward", f"{ours._label}/backward"]
        y_ref, dx_ref, g_ref = step(theirs, torch.cat([x, x]), torch.cat([dy, dy]))
        torch.testing.assert_close(y, y_ref[:3], rtol=0, atol=1e-12)
        # Each replica's input gradient is its half of the concatenated batch's.
        torch.testing.assert_close(dx, dx_ref[:3], rtol=0, atol=1e-12)
        for a, b in zip(g, g_ref, strict=True):  # local sums: half of the global ones
            torch.testing.assert_close(2 * a, b, rtol=0, atol=1e-12)
        assert_same_state(ours, theirs, 1e-12)
    strat.calls.clear()
    ours.eval()
    step(ours, x, dy)
    ours.track_running_stats = False  # eval with batch statistics: still local
    ours.running_mean = ours.running_var = None
    step(ours, x, dy)
    assert strat.calls == []


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_a_mean_far_from_the_shift_takes_the_corrective_pass(fmt, kernels_backend):
    """Shifted float64 sums cancel when the batch mean is far from the running mean: a
    second forward all-reduce repairs the variance, and the result is still PyTorch's
    on the concatenated batch, on the prepared path and the general one."""
    strat = CountingStrategy(2)
    ours, theirs = pair(4, strategy=strat)
    gen = torch.Generator().manual_seed(11)
    x = layout(torch.randn(4, 3, 3, 3, generator=gen, dtype=F64) * 1e-3 + 1e5, fmt)
    dy = layout(torch.randn(4, 3, 3, 3, generator=gen, dtype=F64), fmt)
    y, dx, g = step(ours, x, dy)
    assert strat.calls == [f"{ours._label}/forward"] * 2 + [f"{ours._label}/backward"]
    y_ref, dx_ref, g_ref = step(theirs, torch.cat([x, x]), torch.cat([dy, dy]))
    # Both sides round the mean of values near 1e5 (~1e-11) and divide by σ ~ 3e-3: the
    # outputs agree to ~1e-8; without the repair the variance would be off by ~100%.
    torch.testing.assert_close(y, y_ref[:4], rtol=0, atol=1e-7)
    torch.testing.assert_close(dx, dx_ref[:4], rtol=0, atol=1e-4)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(2 * a, b, rtol=0, atol=1e-6)
    assert_same_state(ours, theirs, 1e-9)


class KernelSpy:
    """Records the data pointer and strides of every array handed to the kernels."""

    def __init__(self, module, seen):
        self.module, self.seen = module, seen

    def record(self, name, arrays):
        self.seen.append((name, [(a.__array_interface__["data"][0], a.strides)
                                 for a in arrays]))

    def call(self, name, real, *args):
        self.record(name, [a for a in args[1:3] if isinstance(a, np.ndarray)])
        return real(*args)

    def __getattr__(self, name):
        real = getattr(self.module, name)

        def spied(*args, **kwargs):
            self.record(name, [a for a in args[:2] if isinstance(a, np.ndarray)])
            return real(*args, **kwargs)

        return spied


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize(("shape", "fmt"), [((4, 3, 3, 5), None),
                                            ((4, 3, 3, 5), torch.channels_last),
                                            ((3, 3, 2, 3, 4), torch.channels_last_3d)])
def test_kernels_read_the_input_and_output_gradient_in_place(monkeypatch, shape, fmt, replicas,
                                                             backend):
    """No layout copy: the kernels get x's and dy's own memory, channels_last included,
    on the prepared path (numba: distbn.ops.step) and the general one (the functions)."""
    import distbn.ops as ops

    if backend == "numba" and ops.backend_name() != "numba":
        pytest.skip("numba kernels not active")
    seen = []
    if backend == "numba":
        from distbn.ops.step import TrainStep

        spy = KernelSpy(TrainStep, seen)
        for name in ("forward", "local_sums", "backward", "grad_sums", "input_grad"):
            real = getattr(TrainStep, name)
            monkeypatch.setattr(TrainStep, name,
                                lambda self, *a, _n=name, _r=real: spy.call(_n, _r, self, *a))
        first, last = (("forward", "backward") if replicas == 1
                       else ("local_sums", "input_grad"))
    else:
        monkeypatch.setattr(ops.backend, "_state", dict(ops.backend._state))
        ops.set_backend("numpy")
        spy, sync_spy = KernelSpy(ops.kernels(), seen), KernelSpy(ops, seen)
        for name in ("synchronized_train_forward", "synchronized_backward"):
            monkeypatch.setattr(ops, name, getattr(sync_spy, name))
        monkeypatch.setattr(ops, "kernels", lambda: spy)
        first, last = (("train_forward", "train_backward") if replicas == 1
                       else ("synchronized_train_forward", "synchronized_backward"))
    bn = dt.SyncBatchNorm(3, strategy=CountingStrategy(replicas))
    x = layout(torch.randn(*shape), fmt).requires_grad_(True)
    dy = layout(torch.randn(*shape), fmt)
    y = bn(x)
    y.backward(dy)
    fmt = fmt or torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)
    forward, backward = seen[0], seen[-1]
    assert (forward[0], backward[0]) == (first, last)
    assert forward[1][0][0] == x.data_ptr()
    assert [p for p, _ in backward[1]] == [dy.data_ptr(), x.data_ptr()]
    # The numpy views walk memory in order: C-contiguous in the permuted layout.
    for _, arrays in (forward, backward):
        for _, strides in arrays:
            assert list(strides) == sorted(strides, reverse=True)


def test_one_replica_makes_no_collective():
    strat = CountingStrategy(1)
    bn = dt.SyncBatchNorm(3, strategy=strat)
    step(bn, torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2))
    assert strat.calls == []


def test_empty_batch_leaves_running_stats_and_counts_the_call_as_torch_does():
    ours, theirs = pair(4)
    x = torch.zeros(0, 3, 2, 2, dtype=F64)
    y, dx, g = step(ours, x, x)
    y_ref, _, _ = step(theirs, x, x)
    assert y.shape == y_ref.shape == x.shape and dx.shape == x.shape
    assert_same_state(ours, theirs, 0)
    assert int(ours.num_batches_tracked) == 1


def test_inplace_relu_after_the_output_is_allowed():
    for fmt in (None, torch.channels_last):
        bn = dt.SyncBatchNorm(3, strategy=distbn.LocalStrategy())
        x = layout(torch.randn(4, 3, 3, 3), fmt).requires_grad_(True)
        torch.relu_(bn(x)).sum().backward()
        assert x.grad.shape == x.shape


def test_errors_name_the_shape():
    bn = dt.SyncBatchNorm(3, strategy=distbn.LocalStrategy())
    with pytest.raises(ValueError, match=r"2D to 5D input .* 1D input of shape \(3,\)"):
        bn(torch.zeros(3))
    with pytest.raises(ValueError, match=r"6D input of shape"):
        bn(torch.zeros(2, 3, 1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"expected 3 channels on axis 1, got an input of "
                                         r"shape \(2, 4, 5\)"):
        bn(torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when "
                                         r"training, got input size torch.Size\(\[1, 3, 1, 1\]\)"):
        bn(torch.zeros(1, 3, 1, 1))
    bn.eval()
    assert bn(torch.zeros(1, 3, 1, 1)).shape == (1, 3, 1, 1)  # fine in eval, as torch
    with pytest.raises(ValueError, match="CPU tensors, got device='meta'"):
        dt.SyncBatchNorm(3, device="meta")
    with pytest.raises(ValueError, match="training=False needs running_mean"):
        dt.sync_batch_norm(torch.zeros(2, 3), None, None, training=False)


def test_one_value_per_channel_is_judged_on_the_global_batch():
    strat = CountingStrategy(2)  # 1 local value x 2 replicas = 2: allowed
    dt.SyncBatchNorm(3, strategy=strat)(torch.zeros(1, 3))
    lonely = CountingStrategy(2, factor=1)  # the other replica is empty: 1 value in all
    with pytest.raises(ValueError, match=r"got input size torch.Size\(\[1, 3\]\) \(1 value "
                                         r"per channel over the 2 replicas"):
        dt.SyncBatchNorm(3, strategy=lonely)(torch.zeros(1, 3))
    assert len(strat.calls) == len(lonely.calls) == 1  # after the collective, everywhere


def mixed_model():
    torch.manual_seed(7)
    inner = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5, momentum=None))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3),
        torch.nn.ReLU(), torch.nn.SyncBatchNorm(4, affine=False),
        torch.nn.Conv3d(4, 4, 1), torch.nn.Flatten(), inner)
    model[1].weight.requires_grad_(False)
    model[1].eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(3)
                if m.affine:
                    m.bias.uniform_(-1, 1)
    return model


def test_convert_and_revert_round_trip_keeps_state_flags_and_parameters():
    model = mixed_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    strat = distbn.LocalStrategy()
    converted = dt.convert_sync_batchnorm(model, strategy=strat)
    bns = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(type(m) is dt.SyncBatchNorm for m in bns)
    assert all(m.strategy is strat for m in bns)
    assert (bns[0].eps, bns[0].training, bns[0].weight.requires_grad) == (1e-3, False, False)
    assert bns[1].affine is False and bns[2].momentum is None
    # The same Parameter objects: an optimizer built before the conversion still works.
    assert all(p is params[n] for n, p in converted.named_parameters())
    state = converted.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in before)

    reverted = dt.revert_sync_batchnorm(converted)
    kinds = [type(m) for m in reverted.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [dt.BatchNormXd] * 3
    assert all(torch.equal(v, before[k]) for k, v in reverted.state_dict().items())
    assert reverted[1].training is False and reverted[1].weight.requires_grad is False
    # Plain torch BN again: any input rank, and PyTorch's own kernels.
    for shape in [(2, 4), (2, 4, 3), (2, 4, 3, 3), (2, 4, 1, 3, 3)]:
        assert reverted[3](torch.randn(*shape)).shape == shape


def test_a_batchnorm_itself_converts_and_torch_state_dicts_load_both_ways():
    bn = torch.nn.BatchNorm2d(3)
    sync = dt.convert_sync_batchnorm(bn, strategy=distbn.LocalStrategy())
    assert type(sync) is dt.SyncBatchNorm
    torch.nn.BatchNorm2d(3).load_state_dict(sync.state_dict())
    sync.load_state_dict(torch.nn.SyncBatchNorm(3).state_dict())
    assert type(dt.revert_sync_batchnorm(torch.nn.SyncBatchNorm(3))) is dt.BatchNormXd


def test_lazy_batchnorm_needs_a_forward_first():
    with pytest.raises(ValueError, match="run one forward pass first"):
        dt.convert_sync_batchnorm(torch.nn.LazyBatchNorm2d(), strategy=distbn.LocalStrategy())


def test_deepcopy_shares_the_strategy_and_pickle_round_trips():
    strat = distbn.LocalStrategy()
    bn = dt.SyncBatchNorm(3, strategy=strat)
    assert copy.deepcopy(bn).strategy is strat
    buf = io.BytesIO()
    torch.save(bn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded.strategy, distbn.Strategy)  # the loading process's one
    assert pickle.loads(pickle.dumps(bn)).num_features == 3


def test_default_strategy_is_the_current_one():
    strat = distbn.LocalStrategy()
    with strat.scope():
        bn = dt.SyncBatchNorm(3)
        model = dt.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    assert bn.strategy is strat and model[0].strategy is strat


def test_import_without_torch_names_the_extra():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import distbn.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert 'pip install -e ".[torch]"' in out.stdout, out.stdout + out.stderr
    assert "distbn[torch]" not in out.stdout  # distbn is not on the package index


def test_init_process_group_single_process_and_its_failure_message(monkeypatch):
    import torch.distributed as dist

    from distbn.torch.process_group import rendezvous_address

    strat = distbn.LocalStrategy()
    env = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29123"}
    assert rendezvous_address(strat, env) == ("10.1.2.3", 29123)
    assert rendezvous_address(strat, {})[0] == "127.0.0.1"
    with pytest.raises(ValueError, match="MASTER_PORT must be a port number, got "
                                         "MASTER_PORT='http'"):
        rendezvous_address(strat, {"MASTER_PORT": "http"})
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    dt.init_process_group(strategy=strat)
    try:
        assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (0, 1, "gloo")
    finally:
        dist.destroy_process_group()
    with socket.socket() as busy:  # a port that is taken: the store cannot listen on it
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        import datetime

        with pytest.raises(RuntimeError, match=rf"address 127\.0\.0\.1, port {port}: .*Set "
                                               "MASTER_ADDR .* MASTER_PORT"):
            dt.init_process_group(strategy=strat, timeout=datetime.timedelta(seconds=5))
    assert not dist.is_initialized()


def test_bench_measure_returns_one_record_per_layout():
    from distbn.torch.bench import measure

    records = measure(shape=(2, 3, 4, 4), samples=2, calls=1, warmup=1)
    assert [r["params"]["layout"] for r in records] == ["contiguous", "channels_last"]
    for r in records:
        assert r["name"] == "torch_bn_fwd_bwd" and r["world_size"] == 1
        assert r["value"] > 0 and r["params"]["distbn_ms"] > 0 and r["params"]["torch_ms"] > 0
    assert np.isfinite([r["value"] for r in records]).all()


def test_kernels_leave_torch_thread_count_alone():
    """numba's OpenMP pool shares libgomp with torch; starting it must not change torch's."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bn = dt.SyncBatchNorm(16, strategy=distbn.LocalStrategy())
        x = torch.randn(32, 16, 16, 16, requires_grad=True)  # large enough for the pool
        bn(x).sum().backward()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
