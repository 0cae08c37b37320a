"""One file-system layer: every path the package reads or writes may be local or remote.

A remote path is any URL fsspec reads (`gs://BUCKET/...` through gcsfs, which etils.epath,
orbax's metadata and tfds use too; the tests point gcsfs and TensorStore at a GCS emulator on
127.0.0.1 with `STORAGE_EMULATOR_HOST`). Local paths go through the standard library
(`os.replace` atomicity); remote ones through fsspec, never from its cached listings: another
process (a run's other hosts, a run being resumed) may have written since, so every listing
or existence check asks the store.

Writes are whole-file and atomic where the store allows: a local file is written to a
temporary name and renamed over the target; a GCS object is replaced in one upload (readers see
the old or the new object, never a torn one). Appending to a remote file means rewriting it
(`Appender`), which is what GCS offers.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import tempfile
import time
from typing import IO, Any

import fsspec


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL (`gs://...`, `s3://...`), False for a local path."""
    return "://" in os.fspath(path)


def join(path: str, *parts: str) -> str:
    """`path/part/...` for a local path or a URL (`os.path.join` keeps `gs://` intact)."""
    return os.path.join(os.fspath(path), *parts)


def remote(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of the URL `path` and the path within it, with the cached
    listings of that path dropped (the next call asks the store)."""
    store, inner = fsspec.core.url_to_fs(os.fspath(path))
    store.invalidate_cache(inner)
    return store, inner


def exists(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    store, inner = remote(path)
    return store.exists(inner)


def isdir(path: str | os.PathLike) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    store, inner = remote(path)
    return store.isdir(inner)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names directly under the directory `path`, sorted."""
    if not is_remote(path):
        return sorted(os.listdir(path))
    store, inner = remote(path)
    if not store.isdir(inner):
        raise FileNotFoundError(f"no directory {os.fspath(path)}")
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in store.ls(inner, detail=False))
    return sorted({n for n in names if n and n != inner.rstrip("/").rsplit("/", 1)[-1]})


def makedirs(path: str | os.PathLike) -> None:
    """Creates the directory `path` and its parents (a no-op on object stores: a folder exists
    once an object is under it)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def open(path: str | os.PathLike, mode: str = "r", **kwargs: Any) -> IO:
    """A file object for `path`. Remote files opened for reading seek with ranged reads (a
    safetensors header and one tensor's bytes are read without fetching the whole object)."""
    if not is_remote(path):
        return builtins.open(path, mode, **kwargs)
    store, inner = remote(path)
    return store.open(inner, mode, **kwargs)


def read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(read_bytes(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` whole and atomically (a temporary file renamed over a local
    target; one upload for a remote object). Creates the parent directory."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        makedirs(parent)
    if is_remote(path):
        store, inner = remote(path)
        store.pipe_file(inner, data)
        return
    fd, tmp = tempfile.mkstemp(
        dir=parent or ".", prefix=os.path.basename(path) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any, **kwargs: Any) -> None:
    write_text(path, json.dumps(value, **kwargs))


def walk_files(path: str | os.PathLike) -> list[str]:
    """The paths of every file under the directory `path` relative to it, sorted (one
    recursive listing of a remote folder)."""
    if not is_remote(path):
        root = os.fspath(path)
        out = [os.path.relpath(os.path.join(d, n), root) for d, _, ns in os.walk(root) for n in ns]
        return sorted(out)
    store, inner = remote(path)
    inner = inner.rstrip("/")
    return sorted(p[len(inner) + 1 :] for p in store.find(inner))


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike, last: str | None = None) -> None:
    """Copies every file under `src` to the same relative path under `dst` (either may be
    remote). `last`: the file copied after all others (the one whose presence marks the copy
    complete, e.g. a checkpoint's `config.json`: never read half-written)."""
    for relative in sorted(walk_files(src), key=lambda name: name == last):
        write_bytes(join(os.fspath(dst), relative), read_bytes(join(os.fspath(src), relative)))


def local_copy(path: str, names: list[str] | tuple[str, ...]) -> str:
    """`path` itself when local; for a remote directory a fresh temporary folder holding a
    copy of its files among `names` that exist (small files a library can only open locally:
    tokenizer and processor files)."""
    if not is_remote(path):
        return path
    target = tempfile.mkdtemp(prefix="visionr1_remote_")
    present = set(listdir(path))
    for name in names:
        if name in present:
            with builtins.open(os.path.join(target, name), "wb") as f:
                f.write(read_bytes(join(path, name)))
    return target


class Appender:
    """A text file that grows by lines: appended in place locally; for a remote path the whole
    object is rewritten (GCS has no append) at most every `flush_secs` seconds and on `flush()`
    / `close()`. It starts from the file's current content (a resumed run continues it)."""

    def __init__(self, path: str, flush_secs: float = 10.0):
        self.path = path
        self.flush_secs = flush_secs
        self._buffer: io.StringIO | None = None
        self._file: IO | None = None
        self._dirty = False
        self._last = time.monotonic()
        parent = os.path.dirname(path)
        if parent:
            makedirs(parent)
        if is_remote(path):
            self._buffer = io.StringIO()
            if exists(path):
                self._buffer.write(read_text(path))
        else:
            self._file = builtins.open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
            return
        if self._buffer is None:
            raise ValueError(f"{self.path}: written after close()")
        self._buffer.write(text)
        self._dirty = True
        if time.monotonic() - self._last >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._buffer is not None and self._dirty:
            write_text(self.path, self._buffer.getvalue())
            self._dirty = False
        self._last = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buffer = None
