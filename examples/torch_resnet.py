"""A small ResNet on distbn's `patterns` data, with synchronized BatchNorm under DDP.

    mpiexec -n 2 python -m mpi4py examples/torch_resnet.py            # synchronized BN
    mpiexec -n 2 python -m mpi4py examples/torch_resnet.py --bn local # PyTorch's local BN
    python examples/torch_resnet.py                                   # one process

An ordinary PyTorch training script; the distbn lines are marked "distbn:". Each rank
takes a contiguous slice of every global batch (the same permutation everywhere), the
loss is the sum over the slice divided by the global batch size (times the world size,
which DDP's gradient averaging divides out again), so N ranks train like one process on
the global batch. Prints the test accuracy and the median training-step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import distbn
import distbn.torch as dt
from distbn.train.data import make_patterns


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected) identity shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    """A stem, three stages of one BasicBlock each (16, 32, 64 channels), a classifier."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(BasicBlock(width, width, 1),
                                    BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def shard(n, rank, world):
    """This rank's contiguous slice of n items."""
    return slice(n * rank // world, n * (rank + 1) // world)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bn", choices=["sync", "local"], default="sync",
                   help="distbn's synchronized BatchNorm, or PyTorch's replica-local one")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--global-batch-size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    # One thread per rank unless told otherwise (mpiexec puts the ranks on shared cores).
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dt.init_process_group()                                   # distbn: DDP from MPI
    strategy = distbn.get_strategy()
    rank, world = strategy.replica_id, strategy.num_replicas_in_sync

    x_train, y_train, x_test, y_test = make_patterns(args.n_train, args.n_test, seed=args.seed)
    # NHWC arrays seen as NCHW tensors: channels_last memory, no copy.
    def tensors(x, y):
        return torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y)

    x_train, y_train = tensors(x_train, y_train)
    x_test, y_test = tensors(x_test, y_test)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = ResNet()
    if args.bn == "sync":
        model = dt.convert_sync_batchnorm(model)              # distbn: synchronized BN
    # The data is channels_last; so are the weights, so that DDP's buckets match the grads.
    model = model.to(memory_format=torch.channels_last)
    model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)

    gbs = args.global_batch_size
    step_times = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.from_numpy(np.random.default_rng([args.seed, epoch]).permutation(
            len(x_train)))
        for start in range(0, len(perm) - gbs + 1, gbs):  # full global batches only
            idx = perm[start:start + gbs][shard(gbs, rank, world)]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = model(x_train[idx])
            loss = F.cross_entropy(logits, y_train[idx], reduction="sum") * (world / gbs)
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)

        model.eval()
        mine = shard(len(x_test), rank, world)
        with torch.no_grad():
            correct = (model(x_test[mine]).argmax(1) == y_test[mine]).sum()
        torch.distributed.all_reduce(correct)
        if rank == 0:
            print(f"epoch {epoch + 1}: test accuracy {correct.item() / len(x_test):.4f}",
                  flush=True)
    if rank == 0:
        warm = step_times[len(step_times) // 4:] or step_times
        print(f"bn={args.bn} ranks={world} global batch {gbs}: median step "
              f"{1e3 * statistics.median(warm):.1f} ms over {len(warm)} steps", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
