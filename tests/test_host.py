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


_RELEASE_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, sys
    import jax
    from visionr1_jax import host

    assert host.keep_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024

    def freed_in_heap():
        # Two written blocks freed below a live one: the kept heap holds 128 MiB of free pages.
        ps = [libc.malloc(size) for _ in range(3)]
        for p in ps:
            ctypes.memset(p, 1, size)
        libc.free(ps[0]); libc.free(ps[1])
        return ps[2]

    jax.jit(lambda x: x + 1)(1.0).block_until_ready()  # the backend starts outside the window
    keep = freed_in_heap()
    before = rss_mib()
    released = host.release_freed_memory()
    after_trim = rss_mib()
    libc.free(keep)
    keep = freed_in_heap()
    host.watch_compiles(release_memory=True)
    host.watch_compiles()  # registered once; still releasing
    before_compile = rss_mib()

    def triple_plus_one(x):
        return x * 3 + 1

    jax.jit(triple_plus_one)(1.0).block_until_ready()  # compiles a new program
    after_compile = rss_mib()
    jax.jit(triple_plus_one)(2.0).block_until_ready()  # cached: no compilation
    assert host.compile_counts().get("jit(triple_plus_one)") == 1, host.compile_counts()
    print(int(released), before - after_trim, before_compile - after_compile)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_release_freed_memory_returns_the_kept_heap_and_after_each_compile_counted():
    out = subprocess.run(
        [sys.executable, "-c", _RELEASE_PROBE], capture_output=True, text=True, check=True
    )
    released, trimmed, after_compile = map(float, out.stdout.split())
    assert released == 1
    # 128 MiB of freed pages go back; the margin leaves 28 MiB for what else the calls touch.
    assert trimmed > 100, trimmed
    assert after_compile > 100, after_compile  # the compile's listener released them too
