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

That price is paid at every compilation: XLA's compiler frees hundreds of MiB of working memory
(~600 MiB for the tiny model's GRPO train step) scattered through the heap, and a kept heap
holds it, so the next compilation or the first steps' buffers stack on top of it.
`watch_compiles(release_memory=True)` hands the free pages back to the kernel (`malloc_trim`)
right after each XLA compilation; steady-state steps, which compile nothing, keep their
buffers mapped. `compile_counts()` tells how many programs each jitted function compiled.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import sys
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: larger blocks than this are still mapped and unmapped
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch
# A program loaded from the persistent compilation cache (JAX_COMPILATION_CACHE_DIR) instead of
# compiled: jax._src.compiler records this event, without the program's name, on each hit.
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"
COMPILE_EVENTS = (_COMPILE_EVENT, CACHE_HIT_EVENT)
_listening = False
_release = False
_compiles: collections.Counter[str] = collections.Counter()


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Makes glibc malloc serve large blocks from the heap and keep freed memory mapped.

    Returns:
      True when both settings were applied (Linux with glibc); False elsewhere, where it does
      nothing.
    """
    libc = _libc()
    try:
        mallopt = libc.mallopt
    except AttributeError:  # no libc here, or not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Both are needed: a high mmap threshold alone makes every free trim the heap (more
    # faults than before), a high trim threshold alone leaves large blocks mapped fresh.
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    )


def release_freed_memory() -> bool:
    """Returns the heap's free pages to the kernel now (glibc `malloc_trim(0)`); the blocks in
    use stay where they are. Returns True when pages were released, False when there was
    nothing to release or no glibc."""
    libc = _libc()
    try:
        trim = libc.malloc_trim
    except AttributeError:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def _on_duration(event: str, _duration: float, fun_name: str = "", **_kw: Any) -> None:
    if event in COMPILE_EVENTS:
        _compiles[fun_name or "(persistent cache)"] += 1
        if _release:
            release_freed_memory()


def watch_compiles(*, release_memory: bool = False) -> None:
    """Counts this process's XLA backend compilations per function from now on
    (`compile_counts`; a program loaded from the persistent compilation cache counts as one,
    under "(persistent cache)"), through a `jax.monitoring` listener registered once. With
    `release_memory` (glibc only), `release_freed_memory()` also runs after each compilation,
    in the compiling thread, before the new program first runs."""
    global _listening, _release
    _release = _release or (release_memory and _libc() is not None)
    if not _listening:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True


def compile_counts() -> dict[str, int]:
    """XLA backend compilations per program name (`jit(<function>)`) since `watch_compiles`."""
    return dict(_compiles)


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """`jax.distributed.initialize` for multi-process launches: explicit when a coordinator
    is given, automatic on a multi-host Cloud TPU slice; nothing for a single process."""
    import os

    import jax

    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()
