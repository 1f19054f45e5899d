"""`init_process_group`: torch.distributed started from the running MPI job."""

from __future__ import annotations

import os
import socket

from distbn.distribute import get_strategy
from distbn.torch._import import require_torch

torch = require_torch()

__all__ = ["init_process_group", "rendezvous_address"]


def _free_port() -> int:
    """A TCP port the OS reports free on this host (rank 0 binds it again soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _own_address() -> str:
    """This host's address as others on the network see it (its name's address)."""
    host = socket.gethostname()
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def rendezvous_address(strategy, environ=None) -> tuple[str, int]:
    """The (address, port) of rank 0's store, agreed on by every rank (collective).

    MASTER_ADDR / MASTER_PORT win where set (on rank 0; its choice is broadcast). Else
    rank 0 picks 127.0.0.1 when every rank runs on its host, its own address otherwise,
    and a free port.

    Args:
        strategy: the distbn strategy spanning the job.
        environ: the environment mapping (default os.environ).

    Returns:
        `(address, port)`, the same on every rank.
    """
    env = os.environ if environ is None else environ
    hosts = strategy.allgather_object(socket.gethostname(), name="init_process_group/hosts")
    choice = None
    if strategy.replica_id == 0:
        addr = env.get("MASTER_ADDR", "").strip()
        if not addr:
            addr = "127.0.0.1" if len(set(hosts)) == 1 else _own_address()
        port_text = env.get("MASTER_PORT", "").strip()
        try:
            port = int(port_text) if port_text else _free_port()
        except ValueError:
            port = None
        choice = (addr, port, port_text)
    addr, port, port_text = strategy.broadcast_object(choice, root=0,
                                                      name="init_process_group/address")
    if port is None:
        raise ValueError(f"MASTER_PORT must be a port number, got MASTER_PORT={port_text!r}")
    return addr, port


def init_process_group(backend="gloo", timeout=None, strategy=None):
    """Start `torch.distributed` from the MPI job, for DistributedDataParallel.

    Rank and world size come from MPI (the strategy); rank 0 chooses the rendezvous
    address and port (`rendezvous_address`) and broadcasts them, so no MASTER_ADDR /
    MASTER_PORT is needed under `mpiexec` or `srun`. Collective over the strategy.

    Args:
        backend: the torch.distributed backend ("gloo" for CPU tensors).
        timeout: a `datetime.timedelta` for the rendezvous and collectives, or None for
            torch's default.
        strategy: the distbn strategy; default `distbn.get_strategy()`.

    Raises:
        RuntimeError: the rendezvous failed; the message names the address and port and
            what to set instead.
    """
    import torch.distributed as dist

    strategy = get_strategy() if strategy is None else strategy
    rank, world = strategy.replica_id, strategy.num_replicas_in_sync
    addr, port = rendezvous_address(strategy)
    host = f"[{addr}]" if ":" in addr else addr  # an IPv6 literal
    kwargs = {} if timeout is None else {"timeout": timeout}
    try:
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank,
                                world_size=world, **kwargs)
    except Exception as exc:
        raise RuntimeError(
            f"torch.distributed.init_process_group(backend={backend!r}) failed on rank "
            f"{rank} of {world} with the rendezvous at address {addr}, port {port}: "
            f"{type(exc).__name__}: {exc}. Set MASTER_ADDR to an address of rank 0's "
            "host that every rank can reach, and MASTER_PORT to a free port on it."
        ) from exc
