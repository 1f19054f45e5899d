"""Independent check: synchronized BN at N ranks against PyTorch float64 autograd.

The reference is plain PyTorch autograd on the concatenated batch (masked statistics
written out with torch ops), not distbn code. Skips when torch is not installed.
"""

import numpy as np
import pytest
from comm_helpers import counting_comm_class

import distbn

torch = pytest.importorskip("torch")

EPS = 1e-3


def torch_reference(x, mask, gamma, beta, dy, axis):
    """Outputs and gradients of masked BN (statistics over unmasked positions) by autograd."""
    xt = torch.tensor(x, requires_grad=True)
    g = torch.tensor(gamma, requires_grad=True)
    b = torch.tensor(beta, requires_grad=True)
    red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    m = torch.ones(x.shape, dtype=torch.float64)
    if mask is not None:  # Keras masks: one axis less, broadcast along the last axis
        m = m * torch.tensor(mask[..., None], dtype=torch.float64)
    n = m.sum(dim=red, keepdim=True)
    mean = (xt * m).sum(dim=red, keepdim=True) / n
    var = (((xt - mean) ** 2) * m).sum(dim=red, keepdim=True) / n
    y = g.reshape(shape) * (xt - mean) / torch.sqrt(var + EPS) + b.reshape(shape)
    (y * torch.tensor(dy)).sum().backward()
    return y.detach().numpy(), xt.grad.numpy(), g.grad.numpy(), b.grad.numpy()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["uneven", "empty"])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_torch_autograd_on_the_concatenated_batch(comm, kind, masked):
    from test_sync_bn_mpi import my_slice

    rng = np.random.default_rng(123)
    x = rng.normal(1.5, 2.0, (19, 4, 5))  # axis 1: 4 channels
    dy = rng.normal(size=x.shape)
    mask = rng.random(x.shape[:-1]) < 0.6 if masked else None
    gamma, beta = rng.normal(1.0, 0.2, 4), rng.normal(0.0, 0.2, 4)
    sl = my_slice(kind, comm, len(x))

    counting = counting_comm_class()
    strategy = distbn.MPIStrategy(counting(comm))
    with strategy.scope():
        bn = distbn.BatchNormalization(axis=1, epsilon=EPS, dtype="float64",
                                       synchronized=True)
    bn.build(x.shape)
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    counting.calls.clear()
    y = bn(x[sl], training=True, mask=None if mask is None else mask[sl])
    dx = bn.backward(dy[sl])
    collectives = dict(counting.calls)
    grads = np.concatenate([bn.gamma.grad, bn.beta.grad])
    strategy.all_reduce(grads)
    strategy.close()

    y_ref, dx_ref, dg_ref, db_ref = torch_reference(x, mask, gamma, beta, dy, axis=1)
    assert collectives == {"Allreduce": 2}  # one forward, one backward
    np.testing.assert_allclose(y, y_ref[sl], rtol=0, atol=1e-10)
    np.testing.assert_allclose(dx, dx_ref[sl], rtol=0, atol=1e-10)
    np.testing.assert_allclose(grads[:4], dg_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(grads[4:], db_ref, rtol=0, atol=1e-10)
