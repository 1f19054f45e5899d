"""`SyncBatchNorm`: PyTorch's BatchNorm module with statistics over distbn's sync group."""

from __future__ import annotations

import itertools

from distbn.distribute import get_strategy
from distbn.torch._import import require_torch
from distbn.torch.function import SyncBatchNormFunction, SyncGroup

torch = require_torch()
_BatchNorm = torch.nn.modules.batchnorm._BatchNorm

__all__ = ["SyncBatchNorm"]

# Labels for check mode and stall reports: modules are built in the same order on every
# rank, so the k-th one has the same label everywhere.
_labels = itertools.count()


class _StrategyRef:
    """Holds a module's strategy: shared by deep copies; pickled as "the current one".

    It also keeps the module's `SyncGroup` (made on the first training call), so neither
    a deep copy nor a pickle carries a strategy of its own.
    """

    __slots__ = ("strategy", "_group")

    def __init__(self, strategy):
        self.strategy = strategy
        self._group = None

    def get(self):
        if self.strategy is None:  # unpickled: the strategy of the loading process
            self.strategy = get_strategy()
        return self.strategy

    def group(self, label):
        """The strategy's `SyncGroup` under `label`, or None for a group of one."""
        strategy = self.get()
        cached = self._group
        if cached is None or cached[0] is not strategy or cached[1] != label:
            group = SyncGroup(strategy, label) if strategy.sync_group_size > 1 else None
            self._group = cached = (strategy, label, group)
        return cached[2]

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_StrategyRef, (None,))


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of a distbn sync group, for CPU tensors.

    PyTorch's `BatchNorm1d/2d/3d` semantics, parameters, buffers and state_dict keys
    (`weight`, `bias`, `running_mean`, `running_var`, `num_batches_tracked`), with the
    batch statistics of training taken over every replica of the strategy's sync group:
    one all-reduce per training forward, one per backward, none in eval and none with a
    single replica. `running_var` gets the unbiased variance with the global count;
    `momentum=None` is the cumulative average over `num_batches_tracked`. Ranks with
    different batch sizes, or none, are exact; an empty global batch leaves the running
    statistics untouched. `weight.grad` / `bias.grad` are this replica's local sums
    (DistributedDataParallel averages them as it does for PyTorch's SyncBatchNorm).

    Inputs: (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W), contiguous or
    channels_last / channels_last_3d (kept, no layout copy); float32 and float64,
    float16/bfloat16 computed in float32 and returned in their dtype.

    Args:
        num_features: C, the channel count (axis 1).
        eps: added to the variance.
        momentum: the running-statistics factor, or None for the cumulative average.
        affine: learnable `weight` and `bias`.
        track_running_stats: keep running statistics (else batch statistics in eval too,
            computed locally, as PyTorch does).
        device, dtype: of the parameters and buffers (CPU only).
        strategy: the distbn strategy; default `distbn.get_strategy()` at construction.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, strategy=None):
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("distbn.torch.SyncBatchNorm runs on CPU tensors, got "
                             f"device={device!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self._strategy_ref = _StrategyRef(get_strategy() if strategy is None else strategy)
        self._label = f"SyncBatchNorm{next(_labels)}"

    @property
    def strategy(self):
        """The distbn strategy whose sync group shares this module's statistics."""
        return self._strategy_ref.get()

    def _check_input_dim(self, input):
        if not 2 <= input.dim() <= 5:
            raise ValueError("expected a 2D to 5D input (N, C, ...), got a "
                             f"{input.dim()}D input of shape {tuple(input.shape)}")

    def forward(self, input):
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels on axis 1, got an "
                             f"input of shape {tuple(input.shape)}")
        if not input.is_cpu:
            raise ValueError("distbn.torch.SyncBatchNorm runs on CPU tensors, got an "
                             f"input on {input.device}")
        # PyTorch's _BatchNorm.forward, step by step; parameters and buffers read from
        # their dicts once (each attribute read is a Python __getattr__ call).
        buffers, params = self._buffers, self._parameters
        training, momentum = self.training, self.momentum
        factor = 0.0 if momentum is None else momentum
        tracked = buffers.get("num_batches_tracked")
        if training and self.track_running_stats and tracked is not None:
            tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(tracked)
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        # Only training synchronizes: eval with batch statistics is local, as in PyTorch.
        group = self._strategy_ref.group(self._label) if training else None
        return SyncBatchNormFunction.apply(input, params.get("weight"), params.get("bias"),
                                           running_mean, running_var, batch_stats, factor,
                                           float(self.eps), group)
