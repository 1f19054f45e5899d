"""Swap PyTorch BatchNorm modules for distbn's `SyncBatchNorm` and back."""

from __future__ import annotations

from distbn.distribute import get_strategy
from distbn.torch._import import require_torch
from distbn.torch.batchnorm import SyncBatchNorm

torch = require_torch()
_BatchNorm = torch.nn.modules.batchnorm._BatchNorm

__all__ = ["BatchNormXd", "convert_sync_batchnorm", "revert_sync_batchnorm"]


class BatchNormXd(_BatchNorm):
    """Plain PyTorch BatchNorm for inputs of any rank 2 to 5 (what `revert` returns)."""

    def _check_input_dim(self, input):
        if not 2 <= input.dim() <= 5:
            raise ValueError("expected a 2D to 5D input (N, C, ...), got a "
                             f"{input.dim()}D input of shape {tuple(input.shape)}")


def _move_state(old, new):
    """Give `new` the parameters, buffers, training flag and qconfig of `old` (shared)."""
    with torch.no_grad():
        if old.affine:
            new.weight = old.weight
            new.bias = old.bias
        new.running_mean = old.running_mean
        new.running_var = old.running_var
        new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _replace(module, make):
    """`module` with every child `make(child)` rebuilt (None: keep), recursively."""
    out = make(module)
    out = module if out is None else out
    for name, child in module.named_children():
        out.add_module(name, _replace(child, make))
    return out


def convert_sync_batchnorm(module, strategy=None):
    """Replace every `BatchNorm1d/2d/3d` and `torch.nn.SyncBatchNorm` with distbn's.

    Parameters and buffers are moved, not copied (an optimizer built before still
    holds them), with their `requires_grad`, and each module keeps its training flag.

    Args:
        module: a `torch.nn.Module` (a BatchNorm itself is converted too).
        strategy: the distbn strategy of the new modules; default `distbn.get_strategy()`.

    Returns:
        The converted module (the same object, unless `module` is itself a BatchNorm).

    Raises:
        ValueError: a lazy BatchNorm that has not seen an input yet.
    """
    strategy = get_strategy() if strategy is None else strategy

    def make(m):
        if not isinstance(m, _BatchNorm) or isinstance(m, SyncBatchNorm):
            return None
        if getattr(m, "has_uninitialized_params", lambda: False)():
            raise ValueError(f"convert_sync_batchnorm: {m!r} is a lazy module whose "
                             "parameters are not initialized; run one forward pass first")
        return _move_state(m, SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine,
                                            m.track_running_stats, strategy=strategy))

    return _replace(module, make)


def revert_sync_batchnorm(module):
    """Replace every distbn and torch `SyncBatchNorm` with a plain `BatchNormXd`.

    For CPU inference and export: the state (parameters, buffers, `requires_grad`,
    training flag) moves over, and the new module accepts inputs of rank 2 to 5.

    Args:
        module: a `torch.nn.Module`.

    Returns:
        The reverted module (the same object, unless `module` is itself a SyncBatchNorm).
    """

    def make(m):
        if not isinstance(m, (SyncBatchNorm, torch.nn.SyncBatchNorm)):
            return None
        return _move_state(m, BatchNormXd(m.num_features, m.eps, m.momentum, m.affine,
                                          m.track_running_stats))

    return _replace(module, make)
