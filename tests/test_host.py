"""host.keep_freed_memory: large freed blocks are reused instead of faulted back in."""

import subprocess
import sys
import textwrap

import pytest

from visionr1_jax import host

_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys
    from visionr1_jax import host
    if sys.argv[1] == "keep":
        assert host.keep_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)
    p = libc.malloc(size); ctypes.memset(p, 1, size); libc.free(p)  # first use
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size); ctypes.memset(p, 1, size)  # same size again, every page written
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, size // 4096)
    """
)


def _faults(mode):
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    faults, pages = map(int, out.stdout.split())
    return faults, pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_reuses_large_blocks():
    default, pages = _faults("default")
    kept, _ = _faults("keep")
    assert default > pages // 2, (default, pages)  # glibc default: unmapped and faulted again
    assert kept < pages // 20, (kept, pages)  # kept mapped: reused without faults


def test_keep_freed_memory_is_idempotent():
    first = host.keep_freed_memory()
    assert host.keep_freed_memory() == first
