"""Check mode: ranks compare what they are about to do before every collective.

Mismatched collectives are the classic MPI bug: one rank reduces a 6-element buffer
while another reduces 7 elements (garbage or a crash), or one rank calls a broadcast
while the others all-reduce (a hang). In check mode each rank first allgathers a small
descriptor of its next collective on a private duplicate communicator and every rank
raises the same `CollectiveMismatchError` if they differ. Off by default: the check is
one extra (pickled) allgather per collective.
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["CHECK_ENV_VAR", "CollectiveMismatchError", "Descriptor", "check_from_env", "verify"]

CHECK_ENV_VAR = "DISTBN_CHECK_COLLECTIVES"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class CollectiveMismatchError(RuntimeError):
    """Replicas disagreed on the next collective; raised on every replica of the group.

    Attributes:
        descriptors: replica id -> the `Descriptor` that replica was about to run.
    """

    def __init__(self, message: str, descriptors: dict):
        super().__init__(message)
        self.descriptors = descriptors


@dataclasses.dataclass(frozen=True)
class Descriptor:
    """What a rank is about to do: compared field by field across ranks.

    Attributes:
        seq: this collective's number on its communicator (1 for the first).
        kind: the strategy method, e.g. "all_reduce", "sync_all_reduce", "broadcast".
        op: the reduction ("sum", ...) or None.
        shape: the buffer's shape, or None for object and barrier collectives.
        dtype: the buffer's dtype name, or None.
        root: the broadcast root, or None.
        name: the caller's label (e.g. a layer name), or None.
    """

    seq: int
    kind: str
    op: str | None = None
    shape: tuple | None = None
    dtype: str | None = None
    root: int | None = None
    name: str | None = None

    def __str__(self) -> str:
        parts = []
        if self.op is not None:
            parts.append(f"op={self.op!r}")
        if self.shape is not None:
            parts.append(f"shape={self.shape}")
        if self.dtype is not None:
            parts.append(f"dtype={self.dtype}")
        if self.root is not None:
            parts.append(f"root={self.root}")
        parts.append(f"name={self.name!r}")
        return f"#{self.seq} {self.kind}({', '.join(parts)})"


def check_from_env(environ=None) -> bool:
    """Whether $DISTBN_CHECK_COLLECTIVES turns check mode on.

    Args:
        environ: the environment mapping (default os.environ).

    Returns:
        True for 1/true/yes/on, False when unset or 0/false/no/off/empty.

    Raises:
        ValueError: any other value, quoted.
    """
    env = os.environ if environ is None else environ
    value = env.get(CHECK_ENV_VAR, "")
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ValueError(
        f"${CHECK_ENV_VAR} must be one of 1/true/yes/on or 0/false/no/off, got {value!r}"
    )


def verify(check_comm, replica_id: int, descriptor: Descriptor) -> None:
    """Allgather `descriptor` on `check_comm`; raise on every rank if any rank differs.

    Args:
        check_comm: a communicator used for nothing else, with the same ranks (in the same
            order) as the communicator the collective will run on.
        replica_id: this rank's id as the user knows it (its rank in the strategy).
        descriptor: what this rank is about to do.

    Raises:
        CollectiveMismatchError: on every rank of `check_comm`, naming which replicas
            had which descriptor.
    """
    gathered = check_comm.allgather((replica_id, descriptor))
    first = gathered[0][1]
    if all(d == first for _, d in gathered):
        return
    by_desc: dict[Descriptor, list[int]] = {}
    for rid, desc in gathered:
        by_desc.setdefault(desc, []).append(rid)
    sides = "; ".join(
        f"replica{'s' if len(rids) > 1 else ''} {', '.join(map(str, rids))} called {desc}"
        for desc, rids in by_desc.items()
    )
    fields = [
        f.name
        for f in dataclasses.fields(Descriptor)
        if len({getattr(d, f.name) for _, d in gathered}) > 1
    ]
    raise CollectiveMismatchError(
        f"collective mismatch across {len(gathered)} replicas (differing: "
        f"{', '.join(fields)}): {sides}",
        {rid: desc for rid, desc in gathered},
    )
