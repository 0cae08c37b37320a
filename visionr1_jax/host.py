"""Host-process tuning for running XLA on CPU (laptop demo, CPU tests, benchmarks).

XLA:CPU allocates each call's output and temporary buffers anew. With glibc's default malloc
settings, blocks above the dynamic mmap threshold (at most 32 MiB) are mapped fresh and
returned to the kernel when freed, so every call page-faults its whole working set back in.
In this project's sandbox (a VM where a fault costs ~1–2 µs per 4 KiB page) that was 25–30% of
a batch-32 model forward and a fixed cost of every matcher call (BENCHMARKS.md).

`keep_freed_memory()` raises glibc's mmap and trim thresholds so large blocks come from the
heap and freed memory stays mapped for the next step. The price: the process keeps its peak
heap instead of shrinking after a spike. Nothing here runs on import; entry points and
benchmarks call it explicitly (in a benchmark it applies to every contender in the process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: larger blocks than this are still mapped and unmapped


def keep_freed_memory() -> bool:
    """Makes glibc malloc serve large blocks from the heap and keep freed memory mapped.

    Returns:
      True when both settings were applied (Linux with glibc); False elsewhere, where it does
      nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both are needed: a high mmap threshold alone makes every free trim the heap (more
    # faults than before), a high trim threshold alone leaves large blocks mapped fresh.
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )
