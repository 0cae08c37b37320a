"""The host process: multi-host helpers, signals, and XLA:CPU memory tuning.

**Multi-host.** Every process of a run holds some rows of each batch (`local_rows`). Arrays
cross between host and devices only through the explicit calls here: `local_values` brings
this process's rows of a row-sharded array to the host (no all-gather), `global_rows` makes a
global array from each process's rows, `gather_rows` gives every process all rows of per-row
host arrays (what the metrics of a step need), `kv_allgather` exchanges JSON values through the
`jax.distributed` key-value store (host RPCs, safe from any thread), and `TermSignal` turns a
SIGTERM into a stop agreed by all processes. `initialize_distributed` starts them.

**XLA:CPU memory** (laptop demo, CPU tests, benchmarks).

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

import base64
import collections
import ctypes
import ctypes.util
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax._src import distributed  # the key-value store: jax has no public client for it
from jax.experimental import multihost_utils

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: larger blocks than this are still mapped and unmapped
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch
# One event per program compiled or loaded from the persistent compilation cache: jax (0.10)
# times `compile_or_get_cached` as a whole under `_COMPILE_EVENT`, with the program's name, so
# a cache hit records it too (counting the cache's own retrieval event as well counted a hit
# twice).
COMPILE_EVENTS = (_COMPILE_EVENT,)
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
        _compiles[fun_name] += 1
        if _release:
            release_freed_memory()


def watch_compiles(*, release_memory: bool = False) -> None:
    """Counts this process's XLA backend compilations per function from now on
    (`compile_counts`; a program loaded from the persistent compilation cache counts as one,
    under its name too), through a `jax.monitoring` listener registered once. With
    `release_memory` (glibc only), `release_freed_memory()` also runs after each compilation,
    in the compiling thread, before the new program first runs."""
    global _listening, _release
    _release = _release or (release_memory and _libc() is not None)
    if not _listening:
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
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


# --------------------------------------------------------------------------------------------
# Rows of a batch across processes

KV_TIMEOUT_MS = 3_600_000  # how long a host waits for the others' values in the key-value store


def local_rows(x: jax.Array) -> np.ndarray:
    """The global row indices of a batch-sharded array that this process holds, in the order
    `make_array_from_process_local_data` takes (and the input pipeline gives) local rows."""
    rows = set()
    for shard in x.addressable_shards:
        rows.update(range(*shard.index[0].indices(x.shape[0])))
    return np.array(sorted(rows), np.int64)


def local_values(arrays: Sequence[jax.Array]) -> list[np.ndarray]:
    """This process's rows of row-sharded global arrays (rows `local_rows(x)`, in that order),
    fetched in one explicit `jax.device_get`: nothing is gathered from other hosts."""
    out = []
    for x in arrays:
        shards = {}
        for shard in x.addressable_shards:
            shards.setdefault(shard.index[0].indices(x.shape[0]), shard.data)
        out.append([shards[k] for k in sorted(shards)])
    fetched = jax.device_get(out)
    return [np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0]) for parts in fetched]


def global_rows(sharding: jax.sharding.Sharding, local: np.ndarray, num_rows: int) -> jax.Array:
    """This process's rows `local` of a `num_rows`-row array, as a global array with
    `sharding` (rows over the batch axes: `sharding.rows_sharding`). One explicit transfer."""
    return jax.make_array_from_process_local_data(sharding, local, (num_rows, *local.shape[1:]))


def kv_allgather(
    key: str, value: Any, *, drop: str | None = None, series: str | None = None
) -> list[Any]:
    """Every process's JSON-serialisable `value` (item p: process p's), exchanged through the
    `jax.distributed` key-value store under `key/<process>`: host-side RPCs, safe from any
    thread. (Not an XLA collective: XLA:CPU runs a process's collective programs one at a
    time in launch order and gloo pairs the processes' collectives by that order, so one
    launched from a background thread while the main thread launches its own can meet a
    different collective on another host: a hang, or gloo's "Received data size doesn't match
    expected size" abort.) One process: `[value]`.

    The store keeps what is set until it is deleted: `drop` names a key of an earlier exchange
    that every process has read by now (this process's entry of it is deleted); `series` does
    it for a sequence of exchanges: this process's entry of the series' previous key is
    deleted once this one is read (every process has set this key, so every process has read
    the previous one)."""
    if jax.process_count() == 1:
        return [value]
    client = distributed.global_state.client
    me = jax.process_index()
    client.key_value_set(f"{key}/{me}", json.dumps(value))
    out = [
        json.loads(client.blocking_key_value_get(f"{key}/{p}", KV_TIMEOUT_MS))
        for p in range(jax.process_count())
    ]
    if series is not None:
        drop, _last_key[series] = _last_key.get(series), key
    if drop is not None and drop != key:
        client.key_value_delete(f"{drop}/{me}")
    return out


_last_key: dict[str, str] = {}  # series -> the key of its latest exchange (`kv_allgather`)


def gather_rows(series: str, key: str, rows: np.ndarray, num_rows: int, arrays: dict):
    """Every process's rows of per-row host arrays, as whole arrays of `num_rows` rows in
    global order (`rows`: the global index of each local row, `local_rows`). One process:
    `arrays` as they are (its rows are all the rows). Else exchanged through the key-value
    store (`kv_allgather` in `series`), each array as its raw bytes."""
    if jax.process_count() == 1:
        return arrays
    mine = {"rows": rows.tolist()}
    mine |= {
        k: base64.b64encode(np.ascontiguousarray(v).tobytes()).decode() for k, v in arrays.items()
    }
    out = {k: np.zeros((num_rows, *v.shape[1:]), v.dtype) for k, v in arrays.items()}
    for part in kv_allgather(key, mine, series=series):
        at = np.asarray(part["rows"], np.int64)
        for k, v in arrays.items():
            data = np.frombuffer(base64.b64decode(part[k]), v.dtype)
            out[k][at] = data.reshape(len(at), *v.shape[1:])
    return out


class TermSignal:
    """Records a SIGTERM instead of dying (installed from the main thread only; elsewhere it
    never fires); `received()` is agreed over the processes, so all stop at the same step."""

    def __init__(self):
        self._flag = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def received(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        flags = multihost_utils.process_allgather(np.int32(self._flag))
        return bool(np.max(flags))

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
