"""Packing many small arrays into a few contiguous buffers, one collective per buffer.

A model has dozens of weights, most of them small; one `Allreduce` per weight would pay
the latency dozens of times a step. `Buckets` lays the arrays out, grouped by dtype, in
buffers of a few MiB (an array larger than that gets a buffer of its own); gradients
are summed and weights broadcast one buffer at a time through the strategy's buffer API.
"""

from __future__ import annotations

import numpy as np

from distbn.checks import check_positive_int

__all__ = ["DEFAULT_BUCKET_BYTES", "Buckets", "GradientAllReduce", "broadcast_weights"]

#: Large enough that per-message latency is negligible, small enough to stay in cache-ish
#: sizes and to bound the extra memory (one buffer per bucket, reused every step).
DEFAULT_BUCKET_BYTES = 4 * 2**20


class Buckets:
    """A fixed layout of arrays (shapes and dtypes) in contiguous per-dtype buffers.

    Args:
        shapes: list of array shapes.
        dtypes: list of numpy dtypes, one per shape.
        bucket_bytes: a bucket is closed once it holds at least this many bytes.
    """

    def __init__(self, shapes, dtypes, bucket_bytes=DEFAULT_BUCKET_BYTES):
        bucket_bytes = check_positive_int(bucket_bytes, "bucket_bytes")
        shapes = [tuple(s) for s in shapes]
        dtypes = [np.dtype(d) for d in dtypes]
        if len(shapes) != len(dtypes):
            raise ValueError(f"got {len(shapes)} shapes but {len(dtypes)} dtypes")
        self.buffers: list[np.ndarray] = []
        # (bucket index, offset, size, shape) per array, in the order given.
        self.slots: list[tuple[int, int, int, tuple]] = [None] * len(shapes)
        for dtype in dict.fromkeys(dtypes):  # first-seen order: the same on every rank
            members = [i for i, d in enumerate(dtypes) if d == dtype]
            used = 0
            pending = []
            for i in members:
                size = int(np.prod(shapes[i], dtype=np.int64))
                pending.append((i, used, size))
                used += size
                if used * dtype.itemsize >= bucket_bytes:
                    self._close(pending, used, dtype, shapes)
                    pending, used = [], 0
            if pending:
                self._close(pending, used, dtype, shapes)

    def _close(self, pending, used, dtype, shapes):
        index = len(self.buffers)
        self.buffers.append(np.zeros(used, dtype=dtype))
        for i, offset, size in pending:
            self.slots[i] = (index, offset, size, shapes[i])

    def pack(self, arrays) -> None:
        """Copy `arrays` (in layout order; None packs zeros) into the buffers."""
        for (b, off, size, _), a in zip(self.slots, arrays, strict=True):
            dst = self.buffers[b][off:off + size]
            if a is None:
                dst[...] = 0
            else:
                dst[...] = np.asarray(a).reshape(-1)

    def views(self) -> list[np.ndarray]:
        """Each array's region of the buffers, in its shape (views, not copies)."""
        return [self.buffers[b][off:off + size].reshape(shape)
                for b, off, size, shape in self.slots]


class GradientAllReduce:
    """Sums the `.grad` of a fixed list of variables over all replicas, bucket by bucket.

    With one replica it does nothing. After a call each variable's `.grad` is a view
    into a bucket buffer, valid until the next call (the optimizer consumes it first).

    Args:
        strategy: the `Strategy` whose `all_reduce` sums over replicas.
        variables: the trainable `Variable`s, in the same order on every rank.
        bucket_bytes: bucket size; see `Buckets`.
    """

    def __init__(self, strategy, variables, bucket_bytes=DEFAULT_BUCKET_BYTES):
        self.strategy = strategy
        self.variables = list(variables)
        self.buckets = None
        if strategy.num_replicas_in_sync > 1:
            self.buckets = Buckets([v.shape for v in self.variables],
                                   [v.dtype for v in self.variables], bucket_bytes)
            self._views = self.buckets.views()

    @property
    def num_buckets(self) -> int:
        """Collectives per call (0 with one replica)."""
        return 0 if self.buckets is None else len(self.buckets.buffers)

    def __call__(self) -> None:
        """All-reduce (sum) every variable's gradient in place of `.grad`."""
        if self.buckets is None:
            return
        self.buckets.pack([v.grad for v in self.variables])
        for i, buf in enumerate(self.buckets.buffers):
            self.strategy.all_reduce(buf, op="sum", name=f"gradients[{i}]")
        for var, view in zip(self.variables, self._views, strict=True):
            var.grad = view


def broadcast_weights(strategy, variables, root=0, bucket_bytes=DEFAULT_BUCKET_BYTES) -> None:
    """Overwrite every variable with `root`'s value (one broadcast per bucket).

    Args:
        strategy: the `Strategy`.
        variables: `Variable`s in the same order on every rank (moving statistics too).
        root: the replica whose values win.
        bucket_bytes: bucket size; see `Buckets`.
    """
    variables = list(variables)
    if strategy.num_replicas_in_sync == 1 or not variables:
        return
    buckets = Buckets([v.shape for v in variables], [v.dtype for v in variables], bucket_bytes)
    buckets.pack([v.value for v in variables])
    for i, buf in enumerate(buckets.buffers):
        strategy.broadcast(buf, root=root, name=f"weights[{i}]")
    for var, view in zip(variables, buckets.views(), strict=True):
        var.assign(view)
