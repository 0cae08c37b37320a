"""Run metrics: one JSON line per step in `<workdir>/metrics.jsonl`, TensorBoard event files
under `<workdir>/tensorboard` (tensorboardX's protos, no TensorFlow), PNG renderings of
completions under `<workdir>/renderings`, optionally the same rows in Weights & Biases
(`metrics.wandb`), and a progress bar.

Only process 0 writes (every process computes the same global values). The workdir may be
local or remote (`gs://...`): every file goes through `visionr1_jax.fs`. A local file grows by
appends; a remote object (GCS has no append) is rewritten whole at most every
`REMOTE_FLUSH_SECS`, at `Writer.flush()` (the loop calls it before each checkpoint save, so a
committed checkpoint's steps are in the workdir) and at `close()`. A remote TensorBoard file is
finished and a new one started once it passes `ROTATE_BYTES`, so an upload never rewrites more.

A resumed run continues the same files: the JSON lines after the checkpoint are dropped
(`truncate_jsonl`), TensorBoard is told to purge the events from that step on (`purge_step`:
a new event file starts with a restart marker at it), and W&B continues the run whose id the
checkpoint holds (`WandbWriter`).

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

import itertools
import json
import math
import os
import secrets
import socket
import string
import struct
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tensorboardX import summary as tb_summary
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c
from tqdm.auto import tqdm

from visionr1_jax import fs, render

# A remote file is uploaded whole at most this often between flushes (GCS has no append).
REMOTE_FLUSH_SECS = 30.0
# A remote TensorBoard event file this large is finished and a new one started.
ROTATE_BYTES = 4 << 20
# Numbers the event files this process starts (two in one second get distinct, ordered names).
_event_files = itertools.count()


def to_python(value: Any) -> Any:
    """A metric value as JSON can hold it: scalars as float/int, NaN/inf as None."""
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        value = np.asarray(value)
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends `{"step": s, **metrics}` lines to `<workdir>/<filename>` (process 0; a remote
    file is rewritten whole at most every `flush_secs`, at `flush()` and at `close()`)."""

    def __init__(
        self, workdir: str, filename: str = "metrics.jsonl", flush_secs: float = REMOTE_FLUSH_SECS
    ):
        self.path = fs.join(workdir, filename)
        self._file = fs.Appender(self.path, flush_secs) if jax.process_index() == 0 else None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, sort_keys=False) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _EventFile:
    """One TensorBoard event file written synchronously: TFRecord frames (u64 length, its
    masked crc32c, an `Event` proto, its masked crc32c). A local file is appended to; a remote
    one is held in memory and uploaded whole at `flush()`."""

    def __init__(self, path: str):
        self.path = path
        self.remote = fs.is_remote(path)
        self.size = 0
        self._buffer = bytearray()
        self._dirty = False
        self._file = None
        if not self.remote:
            fs.makedirs(os.path.dirname(path))
            self._file = open(path, "ab")  # open until close()

    def write(self, event: Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        frame = b"".join((header, struct.pack("<I", masked_crc32c(header)), data,
                          struct.pack("<I", masked_crc32c(data))))  # fmt: skip
        self.size += len(frame)
        if self._file is not None:
            self._file.write(frame)
        else:
            self._buffer += frame
            self._dirty = True

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        elif self._dirty:
            fs.write_bytes(self.path, bytes(self._buffer))
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardWriter:
    """Scalars and images in TensorBoard event files under `<workdir>/tensorboard` (process 0;
    tensorboardX's summary protos, written synchronously: what `flush()` returns from is in
    the file). A local file is flushed after every call; a remote one is uploaded whole at
    most every `flush_secs`, at `flush()` and `close()`, and replaced by a new file once it
    passes `ROTATE_BYTES`.

    `purge_step`: the step a resumed run restarts from. The new file starts with a restart
    marker (a `SessionLog.START` event) at that step, from which TensorBoard drops the earlier
    files' events (files are read in name order, and each name starts with its creation time)."""

    def __init__(
        self, workdir: str, purge_step: int | None = None, flush_secs: float = REMOTE_FLUSH_SECS
    ):
        self.logdir = fs.join(workdir, "tensorboard")
        self.flush_secs = flush_secs
        self._file: _EventFile | None = None
        self._last = time.monotonic()
        if jax.process_index() == 0:
            self._open(purge_step)

    def _open(self, purge_step: int | None = None) -> None:
        # TensorBoard reads a directory's event files in name order: creation time first
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(_event_files):04d}")  # fmt: skip
        self._file = _EventFile(fs.join(self.logdir, name))
        now = time.time()
        self._file.write(Event(wall_time=now, file_version="brain.Event:2"))
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._file.write(Event(wall_time=now, step=int(purge_step), session_log=start))

    def _add(self, step: int, summary: Any) -> None:
        self._file.write(Event(wall_time=time.time(), step=int(step), summary=summary))

    def _written(self) -> None:
        if not self._file.remote or time.monotonic() - self._last >= self.flush_secs:
            self.flush()

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        for key, value in metrics.items():
            value = to_python(value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._add(step, tb_summary.scalar(key, float(value)))
        self._written()

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images`: name -> uint8[H, W, 3]."""
        if self._file is None:
            return
        for name, image in images.items():
            self._add(step, tb_summary.image(name, np.asarray(image), dataformats="HWC"))
        self._written()

    def flush(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        self._last = time.monotonic()
        if self._file.remote and self._file.size >= ROTATE_BYTES:
            self._file.close()  # uploaded for the last time
            self._open()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def wandb_run_id() -> str:
    """A new W&B run id: 8 characters of [a-z0-9] (W&B's own form)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbWriter:
    """The run's rows in Weights & Biases (process 0): every row `Writer.write` writes, with
    the same keys and values as `metrics.jsonl` (NaN and inf as None), at W&B step = the
    optimizer step; the renderings as images at their step.

    Args:
      section: `metrics.wandb` (`sections.run.wandb_config()`).
      workdir: the run's directory; its last component is the default run name.
      run_id: the W&B run to continue (a resumed run's, kept in its checkpoints' meta);
        None: a new id (`run_id` tells it).
      run_config: the run config, shown in W&B.

    W&B accepts only increasing steps: a resumed W&B run already holds the steps a killed run
    logged after its last checkpoint, which the resumed run redoes (bit-identical but for the
    timings), so steps below the W&B run's `starting_step` are not logged again. W&B's local
    files go to `WANDB_DIR` when set, else under a local workdir (`<workdir>/wandb`), else to a
    temporary folder (W&B uploads an online run itself; an offline run must be synced from
    there with `wandb sync`).
    """

    def __init__(
        self,
        section: ml_collections.ConfigDict,
        workdir: str,
        run_id: str | None = None,
        run_config: Mapping[str, Any] | None = None,
    ):
        import wandb  # imported by the runs that log to W&B only (~1 s)

        self._wandb = wandb
        self.run_id = run_id or wandb_run_id()
        directory = os.environ.get("WANDB_DIR") or (
            tempfile.mkdtemp(prefix="visionr1_wandb_") if fs.is_remote(workdir) else workdir
        )
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(
            project=section.project,
            entity=section.get("entity"),
            name=section.get("name") or workdir.rstrip("/").rsplit("/", 1)[-1],
            id=self.run_id,
            resume="allow",
            mode=section.get("mode"),
            dir=directory,
        )
        if run_config is not None:
            self.run.config.update(dict(run_config), allow_val_change=True)
        self._first = int(self.run.starting_step or 0)
        self._skipped = 0

    def _keep(self, step: int) -> bool:
        if step >= self._first:
            return True
        if not self._skipped:
            logging.info("W&B run %s holds steps up to %d already: the redone steps below it "
                         "are not logged again", self.run_id, self._first - 1)  # fmt: skip
        self._skipped += 1
        return False

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._keep(step):
            self.run.log({k: to_python(v) for k, v in metrics.items()}, step=int(step))

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images`: name -> uint8[H, W, 3], logged at `step` (call it before the next
        step's row: W&B closes a step when a later one is logged)."""
        if self._keep(step):
            logged = {name: self._wandb.Image(np.asarray(image)) for name, image in images.items()}
            self.run.log(logged, step=int(step))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_wandb(
    config: ml_collections.ConfigDict, workdir: str, run_id: str | None = None
) -> WandbWriter | None:
    """The run's `WandbWriter` when `metrics.wandb.enabled` (process 0; None elsewhere or
    when off). `run_id`: the W&B run to continue (from the resumed checkpoint)."""
    section = (config.get("metrics") or {}).get("wandb")
    if not section or not section.enabled or jax.process_index() != 0:
        return None
    return WandbWriter(section, workdir, run_id, json.loads(config.to_json_best_effort()))


class Writer:
    """Everything a run writes per step: `metrics.jsonl`, (`tensorboard`) the TensorBoard
    scalars and (`wandb`: a `WandbWriter`) the W&B rows; `images` adds renderings (PNG files
    under `<workdir>/renderings/step_<step>/`, TensorBoard and W&B images). Process 0 only;
    `workdir` local or remote. `flush()` makes every row written so far durable in the
    workdir (the loop calls it before each checkpoint save)."""

    def __init__(
        self,
        workdir: str,
        tensorboard: bool = True,
        purge_step: int | None = None,
        wandb: WandbWriter | None = None,
    ):
        self.workdir = workdir
        self.jsonl = JsonlWriter(workdir)
        self.tb = TensorBoardWriter(workdir, purge_step) if tensorboard else None
        self.wandb = wandb

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run this run logs to (None: W&B off, or not process 0)."""
        return self.wandb.run_id if self.wandb is not None else None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.jsonl.write(step, metrics)
        if self.tb is not None:
            self.tb.scalars(step, metrics)
        if self.wandb is not None:
            self.wandb.scalars(step, metrics)

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> list[str]:
        """Writes each uint8[H, W, 3] image; returns the PNG paths (empty off process 0)."""
        if jax.process_index() != 0:
            return []
        directory = fs.join(self.workdir, "renderings", f"step_{int(step)}")
        paths = []
        for name, image in images.items():
            path = fs.join(directory, name.replace("/", "_") + ".png")
            render.save_png(path, image)
            paths.append(path)
        if self.tb is not None:
            self.tb.images(step, images)
        if self.wandb is not None:
            self.wandb.images(step, images)
        return paths

    def flush(self) -> None:
        """Every row and image written so far is in the workdir when this returns (a remote
        file is uploaded; W&B syncs by itself)."""
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()


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
    """Keeps the lines of a `{"step": ...}` JSON-lines file (local or remote) whose step is
    below `before_step` (a resumed run rewrites the steps after its checkpoint; a line torn by
    a kill is dropped), rewritten whole and atomically (`fs.write_text`). Process 0 only;
    returns the number of lines dropped (0 without a file)."""
    if jax.process_index() != 0 or not fs.exists(path):
        return 0
    lines = [line for line in fs.read_text(path).splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            step = int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by a kill mid-write
            continue
        if step < before_step:
            kept.append(line + "\n")
    fs.write_text(path, "".join(kept))
    return len(lines) - len(kept)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics file (local or remote), in order."""
    return [json.loads(line) for line in fs.read_text(path).splitlines() if line.strip()]


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
