"""The definition of correct for the trainer: N ranks reproduce one rank.

The quickstart, in float64, with a global batch of 31 (uneven shards at 2 and 3 ranks),
trained 12 steps by `distbn train` in one process and by `distbn launch -n 2` and
`-n 3`: with synchronized BatchNormalization the final model.npz files agree to 1e-8;
with replica-local statistics (`model.synchronized=false`) they do not.
"""

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import distbn

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
COMMON = ["--set", "model.dtype=float64", "--set", "train.steps=12",
          "--set", "train.global_batch_size=31", "--set", "logging.progress=none",
          # Fewer test samples: only the final evaluation gets cheaper, the training
          # set (and so every weight) is unchanged.
          "--set", "data.n_test=200"]


def train(tmp_path, nprocs, synchronized=True):
    out = tmp_path / f"n{nprocs}-{'sync' if synchronized else 'local'}"
    options = [QUICKSTART, *COMMON, "--set", f"model.synchronized={str(synchronized).lower()}",
               "--run-dir", out]
    args = ["train", *options] if nprocs == 1 else ["launch", "-n", str(nprocs), *options]
    r = distbn(args, timeout=150)
    assert r.returncode == 0 and not r.timed_out, r.report()
    with np.load(out / "model.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return train(tmp_path_factory.mktemp("equivalence"), 1)


@pytest.mark.parametrize("nprocs", [2, 3])
def test_synchronized_ranks_reproduce_one_rank(tmp_path, one_rank, nprocs):
    weights = train(tmp_path, nprocs)
    diff = max_diff(one_rank, weights)
    print(f"max |w_{nprocs} - w_1| = {diff:.3g}")
    assert diff < 1e-8
    # 12 steps moved every trainable weight well beyond that tolerance.
    assert float(np.max(np.abs(one_rank["dense/kernel"]))) > 1e-3


def test_replica_local_statistics_differ(tmp_path, one_rank):
    weights = train(tmp_path, 3, synchronized=False)
    diff = max_diff(one_rank, weights)
    print(f"replica-local: max |w_3 - w_1| = {diff:.3g}")
    assert diff > 1e-4
    # The trained weights differ too, not only the averaged moving statistics.
    assert float(np.max(np.abs(one_rank["conv2d/kernel"] - weights["conv2d/kernel"]))) > 1e-6
