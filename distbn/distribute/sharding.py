"""How a global batch is split over replicas: one rule for the trainer and the adapters."""

from __future__ import annotations

__all__ = ["shard_slice"]


def _count(name, value, low) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def shard_slice(global_batch_len, rank, world_size) -> slice:
    """This rank's contiguous part of a global batch.

    The first `global_batch_len % world_size` ranks get one extra sample, so shard sizes
    differ by at most one; when the batch is smaller than the world, the last ranks get
    empty shards (they still take part in every collective).

    Args:
        global_batch_len: number of samples in the global batch.
        rank: this replica's index, `0 <= rank < world_size`.
        world_size: number of replicas.

    Returns:
        A `slice` into the global batch.
    """
    length = _count("global_batch_len", global_batch_len, 0)
    world_size = _count("world_size", world_size, 1)
    rank = _count("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
    base, rem = divmod(length, world_size)
    start = rank * base + min(rank, rem)
    return slice(start, start + base + (1 if rank < rem else 0))
