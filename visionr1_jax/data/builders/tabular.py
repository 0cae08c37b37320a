"""Reading parquet / arrow tables (HF dataset exports) row by row with pyarrow."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")
TABLE_SUFFIXES = (".parquet", ".arrow")


def reject_pickle(path: epath.Path) -> None:
    """Raises for a pickle file: unpickling runs arbitrary code, annotations must be data."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"refusing to unpickle {path}: pickle can execute arbitrary code. Convert the "
            "annotations to JSON (e.g. refs(unc).json) or parquet and place that file instead."
        )


def walk_files(root: epath.Path) -> list[epath.Path]:
    """Every file under ``root`` (recursively), sorted; works for local and gs:// paths."""
    out, todo = [], [root]
    while todo:
        for p in todo.pop().iterdir():
            (todo if p.is_dir() else out).append(p)
    return sorted(out)


def find_tables(root: epath.Path) -> list[epath.Path]:
    """All ``*.parquet`` / ``*.arrow`` files under ``root``, sorted (stable record ids)."""
    return [p for p in walk_files(root) if p.suffix.lower() in TABLE_SUFFIXES]


def iter_rows(path: epath.Path, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Yields the rows of a parquet file or an arrow IPC file/stream as Python dicts,
    a batch of rows at a time (images are never all in memory)."""
    if path.suffix.lower() == ".parquet":
        batches = pq.ParquetFile(str(path)).iter_batches(batch_size=batch_size)
        for batch in batches:
            yield from batch.to_pylist()
        return
    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_stream(source)  # HF `datasets` writes the stream format
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield from reader.get_batch(i).to_pylist()
            return
        for batch in reader:
            yield from batch.to_pylist()


def image_bytes(value: Any, root: epath.Path) -> bytes:
    """The encoded bytes of an HF ``Image`` cell: ``{"bytes", "path"}``, raw bytes or a path
    relative to ``root``. Missing or unreadable: b"" (flagged later as a missing image)."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = epath.Path(value) if value.startswith("/") else root / value
        try:
            return path.read_bytes()
        except OSError:
            return b""
    return b""
