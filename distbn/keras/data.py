"""This rank's part of in-memory arrays for `model.fit`.

With `global_batch_size`, rank r's array is the r-th part of every global batch, laid
end to end, so `fit(batch_size=local_batch_size(G), shuffle=False)` on N ranks sees
the same global batches as one process with `batch_size=G`. Parts differ by at most one
sample (the first `G % N` ranks get one more), as distbn's own sharded loader splits.
"""

from __future__ import annotations

import numpy as np

from distbn.distribute import get_strategy
from distbn.distribute.sharding import shard_slice

__all__ = ["local_batch_size", "shard"]


def _part(length, rank, size):
    part = shard_slice(length, rank, size)  # the trainer's rule
    return part.start, part.stop


def local_batch_size(global_batch_size, strategy=None):
    """This rank's batch size: its part of `global_batch_size` (the largest part).

    Pass it to `fit(batch_size=...)` together with `shard(..., global_batch_size=G)`.
    """
    strategy = strategy if strategy is not None else get_strategy()
    g = _check_batch(global_batch_size, strategy)
    start, stop = _part(g, strategy.replica_id, strategy.num_replicas_in_sync)
    return stop - start


def _check_batch(global_batch_size, strategy):
    n = strategy.num_replicas_in_sync
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < n:
        raise ValueError(
            f"global_batch_size must be an int of at least the number of replicas ({n}); "
            f"received {global_batch_size!r}"
        )
    if global_batch_size % n:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a multiple of the {n} replicas: "
            "Keras batches every rank's array by one batch_size, so the parts must be equal"
        )
    return int(global_batch_size)


def shard(*arrays, global_batch_size=None, drop_remainder=True, strategy=None):
    """This rank's slice of each array (same first dimension), for `fit`/`evaluate`.

    Args:
        *arrays: numpy arrays (or anything indexable with a first dimension).
        global_batch_size: None: one contiguous slice per rank (parts differ by at most
            one; for evaluation). An int G (a multiple of the replicas): the rank's part
            of every global batch of G, in order, for `fit(batch_size=G // N,
            shuffle=False)`.
        drop_remainder: with `global_batch_size`, drop a last partial global batch
            (every rank must take the same number of steps). False: keep it if it still
            splits into equal parts, else raise.
        strategy: a distbn strategy; default `distbn.get_strategy()`.

    Returns:
        One array per input (a single array when one was given).
    """
    if not arrays:
        raise TypeError("shard() needs at least one array")
    strategy = strategy if strategy is not None else get_strategy()
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"shard() arrays must have the same length; received {sorted(lengths)}")
    length = lengths.pop()
    rank, size = strategy.replica_id, strategy.num_replicas_in_sync
    if global_batch_size is None:
        start, stop = _part(length, rank, size)
        out = tuple(a[start:stop] for a in arrays)
    else:
        g = _check_batch(global_batch_size, strategy)
        full, rest = divmod(length, g)
        local = g // size
        index = (np.arange(full)[:, None] * g + rank * local + np.arange(local)).ravel()
        if rest and not drop_remainder:
            if rest % size:
                raise ValueError(
                    f"the last global batch has {rest} samples, which do not split into "
                    f"{size} equal parts; pass drop_remainder=True"
                )
            part = rest // size
            index = np.concatenate([index, full * g + rank * part + np.arange(part)])
        out = tuple(a[index] for a in arrays)
    return out[0] if len(out) == 1 else out
