"""Probes of process-wide state that tests run in fresh processes and Dask workers (importable there: the tests
put this folder on their ``PYTHONPATH``; spawned workers inherit ``sys.path``)."""

import ctypes
import resource

_libc = ctypes.CDLL("libc.so.6")
_libc.malloc.restype = ctypes.c_void_p
_libc.free.argtypes = [ctypes.c_void_p]


def fresh_block_faults() -> int:
    """Page faults of a fresh 64 MiB block (a batch of activations: above glibc's mmap threshold).

    > 10,000 with glibc's defaults, ~0 once the entry point's allocator setting keeps freed memory.
    """
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = _libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    _libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
