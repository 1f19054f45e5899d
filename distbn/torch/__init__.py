"""distbn for PyTorch: synchronized BatchNorm on CPU tensors over MPI, and DDP from MPI.

    import distbn.torch as dt
    model = dt.convert_sync_batchnorm(model)   # every BatchNorm*d -> dt.SyncBatchNorm
    dt.init_process_group()                    # torch.distributed (gloo) from the MPI job
    model = torch.nn.parallel.DistributedDataParallel(model)

PyTorch is an optional extra: importing this package without it raises an ImportError
that names the extra. See docs/torch.md.
"""

from distbn.torch._import import require_torch

require_torch()

from distbn.torch.batchnorm import SyncBatchNorm  # noqa: E402
from distbn.torch.convert import (  # noqa: E402
    BatchNormXd,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from distbn.torch.function import sync_batch_norm  # noqa: E402
from distbn.torch.process_group import init_process_group  # noqa: E402

__all__ = [
    "SyncBatchNorm", "BatchNormXd", "convert_sync_batchnorm", "revert_sync_batchnorm",
    "init_process_group", "sync_batch_norm",
]
