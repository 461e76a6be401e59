"""glibc keeps freed memory for reuse once rsseg.pipeline.process says so (checked in a fresh process)."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource
from rsseg.pipeline.process import retain_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)  # 64 MiB, as a batch of activations: above glibc's mmap threshold
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_fresh_block()
default = faults_of_a_fresh_block()
applied = retain_freed_memory()
faults_of_a_fresh_block()
print(applied, default, faults_of_a_fresh_block())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    applied, default, retained = done.stdout.split()
    assert applied == "True"
    assert int(default) > 10_000  # 64 MiB of 4 KiB pages, faulted in on every allocation by default
    assert int(retained) < 100  # served from the kept heap
