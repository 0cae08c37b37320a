"""Run metrics: one JSON line per step in `<workdir>/metrics.jsonl` and a progress bar.

Only process 0 writes (every process computes the same global values). The writer appends, so
a resumed run continues the same file; full telemetry (TensorBoard, renderings) builds on this.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def to_python(value: Any) -> Any:
    """A metric value as JSON can hold it: scalars as float/int, NaN/inf as None."""
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        value = np.asarray(value)
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends `{"step": s, **metrics}` lines to `<workdir>/metrics.jsonl` (process 0)."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
        self.path = os.path.join(workdir, filename)
        self._file = None
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, sort_keys=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def truncate_jsonl(path: str, before_step: int) -> int:
    """Keeps the lines of a `{"step": ...}` JSON-lines file whose step is below `before_step`
    (a resumed run rewrites the steps after its checkpoint; a line torn by a kill is dropped);
    atomic (a temporary file renamed over it). Process 0 only; returns the number of lines
    dropped (0 without a file)."""
    if jax.process_index() != 0 or not os.path.exists(path):
        return 0
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                rows.append({"step": before_step})
    kept = [r for r in rows if int(r["step"]) < before_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return len(rows) - len(kept)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm progress bar over optimizer steps on process 0 (silent elsewhere or when
    disabled), showing the latest reward, KL and seconds per step."""

    KEYS = (("reward/total", "reward"), ("kl", "kl"), ("loss", "loss"), ("time/step", "s/step"))

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=not enabled or jax.process_index() != 0,
            dynamic_ncols=True,
        )

    def update(self, steps: int, metrics: Mapping[str, Any]) -> None:
        shown = {}
        for key, name in self.KEYS:
            value = to_python(metrics.get(key))
            if isinstance(value, int | float):
                shown[name] = f"{value:.3g}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
