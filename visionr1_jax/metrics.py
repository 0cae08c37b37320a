"""Run metrics: one JSON line per step in `<workdir>/metrics.jsonl`, TensorBoard event files
under `<workdir>/tensorboard` (tensorboardX: no TensorFlow), PNG renderings of completions
under `<workdir>/renderings`, and a progress bar.

Only process 0 writes (every process computes the same global values). The writers append, so
a resumed run continues the same files: the JSON lines after the checkpoint are dropped
(`truncate_jsonl`) and TensorBoard is told to purge the events from that step on
(`purge_step`).

The keys the GRPO loop writes each optimizer step (`train.grpo_iteration`, `train.train_loop`):

- reward: `reward/{total,format,recall,precision}` and their `..._std` over the rollout's
  completions, `reward/group_std` (mean within-group std), `reward/zero_std_groups`
  (fraction of groups whose G rewards are equal: no learning signal);
- boxes: `matched_iou`, `matched_giou` (mean over a completion's matched pairs, then over
  completions), `boxes/pred`, `boxes/gt`, `boxes/matched` per completion, `parse_rate`
  (official format check passed), `parse_failure` (the configured format check failed);
- the thresholds in force: `threshold/*` (the rule-refinement stage of the step);
- policy: `loss`, `kl` (β > 0), `clip_frac`, `clip_frac_low`, `clip_frac_high`, `ratio_*`,
  `grad_norm`, `learning_rate`, `entropy` (token mean of the sampling distribution's
  entropy), `completion/length`, `completion/truncated`;
- time: `time/{data,rollout,reward,reference,update,step}` seconds (`time/data`: waiting for
  the input pipeline), `time/checkpoint` (after a save), `throughput/tokens_per_s`
  (completion tokens per second of the step), `throughput/rollout_tokens_per_s`;
- health: `compiles` (XLA compilations so far), `bad_step`, `bad_steps_total`,
  `data/skipped_total`, `data/selected_out_total` and per kind (summed over hosts);
- evaluation, every `eval.every` steps of GRPO or SFT: `eval/<metric>` (`evaluate.
  compute_metrics`: the protocol's metrics and the reward's view of the answers), `time/eval`.

An SFT step writes `loss`, `grad_norm`, `learning_rate`, `num_tokens`, `sft/answer_len`,
`sft/truncated`, the time and health keys.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from visionr1_jax import render

_warned_remote: set[str] = set()


def local_dir(workdir: str) -> str:
    """Where the run's metrics files go: `workdir` itself, or for a remote (`gs://`) workdir a
    local mirror `./runs_local/gs/BUCKET/...` (checkpoints go to the remote workdir through
    orbax; uploading the metrics files is not implemented yet, so they are never written to a
    local directory named `gs:` by accident). Logs where, once per workdir."""
    if "://" not in workdir:
        return workdir
    path = os.path.abspath(os.path.join("runs_local", workdir.replace("://", "/", 1)))
    if workdir not in _warned_remote and jax.process_index() == 0:
        logging.warning("metrics of the remote workdir %s are written locally to %s", workdir, path)
        _warned_remote.add(workdir)
    return path


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
        workdir = local_dir(workdir)
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


class TensorBoardWriter:
    """Scalars and images in TensorBoard event files under `<workdir>/tensorboard`
    (process 0; tensorboardX). `purge_step`: the step a resumed run restarts from (TensorBoard
    drops the earlier run's events from it on)."""

    def __init__(self, workdir: str, purge_step: int | None = None):
        self.logdir = os.path.join(local_dir(workdir), "tensorboard")
        self._writer = None
        if jax.process_index() == 0:
            self._writer = SummaryWriter(self.logdir, purge_step=purge_step, flush_secs=30)

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        for key, value in metrics.items():
            value = to_python(value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(key, float(value), int(step))

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images`: name -> uint8[H, W, 3]."""
        if self._writer is None:
            return
        for name, image in images.items():
            self._writer.add_image(name, np.asarray(image), int(step), dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Writer:
    """Everything a run writes per step: `metrics.jsonl` and (`metrics.tensorboard`) the
    TensorBoard scalars; `images` adds renderings (TensorBoard and PNG files under
    `<workdir>/renderings/step_<step>/`). Process 0 only."""

    def __init__(self, workdir: str, tensorboard: bool = True, purge_step: int | None = None):
        self.workdir = workdir
        self.jsonl = JsonlWriter(workdir)
        self.tb = TensorBoardWriter(workdir, purge_step) if tensorboard else None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.jsonl.write(step, metrics)
        if self.tb is not None:
            self.tb.scalars(step, metrics)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> list[str]:
        """Writes each uint8[H, W, 3] image; returns the PNG paths (empty off process 0)."""
        if jax.process_index() != 0:
            return []
        directory = os.path.join(local_dir(self.workdir), "renderings", f"step_{int(step)}")
        paths = []
        for name, image in images.items():
            path = os.path.join(directory, name.replace("/", "_") + ".png")
            render.save_png(path, image)
            paths.append(path)
        if self.tb is not None:
            self.tb.images(step, images)
        return paths

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def sum_over_processes(counts: Mapping[str, int | float]) -> dict[str, int | float]:
    """Each key's sum over the processes (keys seen on any host; every process calls it, with
    one small all-gather of each host's JSON). One process: `counts` unchanged."""
    if jax.process_count() == 1:
        return dict(counts)
    blob = np.frombuffer(json.dumps(dict(counts)).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    out: dict[str, int | float] = {}
    for row, size in zip(rows, sizes, strict=True):
        for key, value in json.loads(bytes(row[:size])).items():
            out[key] = out.get(key, 0) + value
    return out


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
