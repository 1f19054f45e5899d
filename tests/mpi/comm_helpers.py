"""Helpers shared by the MPI tests."""

import collections

from mpi4py import MPI

COUNTED = ("Allreduce", "Bcast", "Barrier", "allgather", "allreduce", "bcast",
           "Dup", "Split", "Split_type")


def counting_comm_class():
    """A fresh Intracomm subclass counting every communication method called on it."""

    class CountingComm(MPI.Intracomm):
        calls = collections.Counter()  # class-level: Dup makes instances without __init__

    for meth in COUNTED:
        def counted(self, *args, _meth=meth, **kwargs):
            CountingComm.calls[_meth] += 1
            return getattr(MPI.Intracomm, _meth)(self, *args, **kwargs)

        setattr(CountingComm, meth, counted)
    return CountingComm
