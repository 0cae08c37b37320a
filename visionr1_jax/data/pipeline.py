"""The input pipeline: tfds records -> static-shape prompt batches -> global arrays on the mesh.

Stages (one host; every host runs the same code on its own shard)::

    tfds.data_source (random access, numpy)
      -> shuffle(seed), repeat(num_epochs)                  one global order, every host alike
      -> host rows: [p·b, (p+1)·b) of each global batch     disjoint, union = the split; the
                                                            global batch is the same for any P
      -> encode (num_threads threads): instance-count selection, checks, decode, smart
         resize into [min_pixels, max_pixels], normalise + patchify (as the HF Qwen2-VL
         processor), tokenise the chat prompt; a record selected out or bad becomes a
         BadRecord marker
      -> drop BadRecord markers, count them by kind, log bad ids     (resumable counters)
      -> batch B/P per host, pad to static buckets (prompt length, patches, instances)
      -> thread prefetch of `prefetch` batches
      -> global jax.Arrays sharded over the batch axes (make_array_from_process_local_data)

Determinism: the order is a pure function of (seed, epoch, host rows); threads only change
*when* elements are computed, never their order. Resume: ``get_state()`` after any number of
batches, saved with the checkpoint (one small JSON per host), restores the exact position,
including the skip counters.

Selection (``data.min_instances``/``data.max_instances``): records whose box count N is
outside the range are dropped before any other check and counted as
``data/selected_out/<kind>`` (the RL recipe keeps 1 <= N <= 30, SPEC §6); never an error,
never a per-record warning. Evaluation keeps every record: build its pipeline from
``config.eval_config(c)`` (selection off, one epoch, file order).

Bad data (``data.bad_data``, kinds in ``records.check_record`` plus ``corrupt_image``,
``bad_aspect_ratio``, ``prompt_too_long``): ``skip`` drops bad records while running (counted,
exported by ``metrics()``); ``error`` scans the host's shard before the first batch
(``preflight``) and raises ``BadRecord`` with the record id and the reason. Kept records with
boxes outside the image or of zero extent are counted as ``data/noted/<kind>`` (the boxes
are kept unchanged, as the reference does; see ``records``).

Batch layout (per host, b = B / P rows; the global arrays have B rows):

    input_ids       i32[b, T]      left-padded chat prompts, T from ``length_buckets``
    attention_mask  i32[b, T]
    pixel_values    f32[b, S, F]   each row's patches (HF layout), zero-padded to S patches
                                   (``patch_buckets``), F = 3·2·14·14        (pixels=float32)
    pixel_patches   u8[b, S, F/2]  the same patches before rescale/normalise and without the
                                   temporal copy (pixels=uint8, the default): 8x less host
                                   work and transfer; ``global_arrays`` turns them into
                                   ``pixel_values`` on the devices (``PixelNormalizer``)
    image_grid_thw  i32[b, 3]      (1, h_in/14, w_in/14); zeros for padding rows
    gt_boxes        f32[b, N, 4]   xyxy in ORIGINAL image pixels, N = max_instances (no upper
                                   bound: the next power of two >= the batch's largest count)
    gt_classes      i32[b, N]      label ids from the record's label map (0 = padding)
    gt_mask         bool[b, N]
    image_size      i32[b, 2]      original (H, W)
    input_size      i32[b, 2]      resized model input (h_in, w_in) = grid·14
    valid           bool[b]        False for padding rows (finite epochs only)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import math
import os
import queue
import re
import shutil
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from grain.experimental import ThreadPrefetchIterDataset
from jax.experimental import multihost_utils
from PIL import Image
from tokenizers import Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

import visionr1_jax.data.builders  # noqa: F401  (registers the builders with tfds)
from visionr1_jax import fs, host, sharding
from visionr1_jax.data import config as config_lib
from visionr1_jax.data import records
from visionr1_jax.data.builders import user_coco
from visionr1_jax.data.target import Target

ARRAY_KEYS = (
    "input_ids", "attention_mask", "image_grid_thw", "gt_boxes", "gt_classes", "gt_mask",
    "image_size", "input_size", "valid",
)  # fmt: skip
PIXEL_KEYS = {"float32": "pixel_values", "uint8": "pixel_patches"}
_PROMPT_SENTINEL = "\x00PROMPT\x00"
_PIPELINES = itertools.count()  # names each pipeline's bucket agreements (same on every host)


# ------------------------------------------------------------------------------------ encoding


@dataclasses.dataclass(frozen=True)
class Example:
    """One encoded record (host side, ragged).

    Attributes:
      input_ids: i32[T_i] chat prompt with the image tokens expanded.
      pixel_values: f32[S_i, F] patches in the HF processor's layout, or u8[S_i, F/2] raw
        patches (``pixels=uint8``).
      grid_thw: i32[3] (1, h_in/14, w_in/14).
      boxes: f32[N_i, 4] xyxy original pixels. classes: i32[N_i] label ids.
      notes: ``records.NOTE_KINDS`` kinds this record is counted under (kept as it is).
    """

    record_id: str
    input_ids: np.ndarray
    pixel_values: np.ndarray
    grid_thw: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    labels: tuple[str, ...]
    label_map: dict[str, int]
    image_size: tuple[int, int]
    input_size: tuple[int, int]
    task: str
    prompt: str
    notes: tuple[str, ...] = ()


class Encoder:
    """Turns a record into an ``Example`` exactly as the HF Qwen2-VL processor would.

    Resize (smart resize, factor 28, bicubic), rescale, normalise and patchify follow
    ``Qwen2VLImageProcessorPil``; the prompt is the chat template applied to one image and the
    record's prompt, with ``<|image_pad|>`` expanded to ``S_i / merge_size²`` tokens. A private
    copy of the Rust tokenizer is used so that encoding threads never share mutable tokenizer
    state with the trainer.
    """

    def __init__(self, processor: Any, c: ml_collections.ConfigDict):
        ip = processor.image_processor
        self.patch = int(ip.patch_size)
        self.merge = int(ip.merge_size)
        self.temporal = int(ip.temporal_patch_size)
        self.mean = np.asarray(ip.image_mean, np.float32)
        self.std = np.asarray(ip.image_std, np.float32)
        self.rescale = float(ip.rescale_factor)
        self.min_pixels, self.max_pixels = int(c.min_pixels), int(c.max_pixels)
        self.limits = records.Limits(
            int(c.min_instances), None if c.max_instances is None else int(c.max_instances)
        )
        self.max_prompt_len = int(c.max_prompt_len)
        tok = processor.tokenizer
        self.tokenizer = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        self.image_pad_id = int(tok.convert_tokens_to_ids("<|image_pad|>"))
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": _PROMPT_SENTINEL}],
            }
        ]
        chat = tok.apply_chat_template(  # as processing.render_prompt, with the processor's
            messages,  # template when the tokenizer carries none
            chat_template=getattr(tok, "chat_template", None) or processor.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        self.chat_prefix, self.chat_suffix = chat.split(_PROMPT_SENTINEL)
        self.feature_dim = 3 * self.temporal * self.patch**2
        self.pixel_format = str(c.pixels)
        self.normalizer = PixelNormalizer(
            mean=tuple(float(v) for v in self.mean), std=tuple(float(v) for v in self.std),
            rescale=self.rescale, temporal=self.temporal,
        )  # fmt: skip
        self.max_patches = self.patches_for(self.max_pixels)

    def patches_for(self, pixels: int) -> int:
        """Upper bound of S_i for images of at most ``pixels`` pixels (a multiple of merge²)."""
        unit = self.patch * self.merge
        return (pixels // unit**2) * self.merge**2

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h_in, w_in) of the smart resize: multiples of 28 within [min_pixels, max_pixels]."""
        return smart_resize(
            height,
            width,
            factor=self.patch * self.merge,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def token_ids(self, prompt: str, num_image_tokens: int) -> np.ndarray:
        """i32[T]: the chat prompt's ids with the single image pad expanded."""
        ids = self.tokenizer.encode(self.chat_prefix + prompt + self.chat_suffix).ids
        at = ids.index(self.image_pad_id)
        return np.asarray(
            ids[:at] + [self.image_pad_id] * num_image_tokens + ids[at + 1 :], np.int32
        )

    def _patch_grid(self, x: np.ndarray) -> np.ndarray:
        """[h, w, 3] -> [S, 3, p, p] in the HF patch order (gh/m, gw/m, m, m)."""
        p, m = self.patch, self.merge
        gh, gw = x.shape[0] // p, x.shape[1] // p
        x = x.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        return x.reshape(gh * gw, 3, p, p)

    def raw_patches(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """u8[S, 3·p·p]: ``image`` resized to ``size`` = (h_in, w_in), cut into patches."""
        h, w = size
        x = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC), np.uint8)
        return np.ascontiguousarray(self._patch_grid(x)).reshape(-1, 3 * self.patch**2)

    def pixels(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """f32[S, F] normalised patches of ``image`` resized to ``size`` = (h_in, w_in)."""
        h, w = size
        x = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC), np.float32)
        x = self._patch_grid((x * self.rescale - self.mean) / self.std)
        x = np.broadcast_to(x[:, :, None], (x.shape[0], 3, self.temporal, *x.shape[2:]))
        return np.ascontiguousarray(x.reshape(x.shape[0], self.feature_dim))

    def _screen(self, record: Mapping[str, Any]) -> tuple[int, int]:
        """The selection and the checks that need no decoded image; returns (h_in, w_in).

        Raises:
          BadRecord: selected out (``records.SELECTION_KINDS``), ``records.check_record``'s
            kinds, or ``bad_aspect_ratio``: smart resize rejects the shape (aspect ratio
            > 200) or, for a very elongated image, resizes it to more than ``max_pixels``
            (more patches than any bucket holds).
        """
        rid = records.as_text(record["id"])
        reason = records.select_record(record, self.limits) or records.check_record(record)
        if reason:
            raise records.BadRecord(rid, reason)
        height, width = int(record["height"]), int(record["width"])
        try:
            h_in, w_in = self.input_size(height, width)
        except ValueError as e:
            raise records.BadRecord(rid, f"bad_aspect_ratio: {width}x{height}: {e}") from None
        if h_in * w_in > self.max_pixels:
            raise records.BadRecord(
                rid,
                f"bad_aspect_ratio: {width}x{height} resizes to {w_in}x{h_in} > "
                f"max_pixels={self.max_pixels}",
            )
        return h_in, w_in

    def check(self, record: Mapping[str, Any], *, draft: bool = True) -> tuple[str, ...]:
        """Every check of ``encode`` without the resize.

        Returns:
          the record's notes (``records.box_notes``).
        Raises:
          BadRecord: the record is selected out or bad (``reason`` names the kind).
        """
        rid = records.as_text(record["id"])
        h_in, w_in = self._screen(record)
        records.decode_image(record, draft=draft)
        n_tokens = (h_in // self.patch) * (w_in // self.patch) // self.merge**2
        length = len(self.token_ids(records.as_text(record["prompt"]), n_tokens))
        if length > self.max_prompt_len:
            raise records.BadRecord(
                rid, f"prompt_too_long: {length} tokens > max_prompt_len={self.max_prompt_len}"
            )
        return records.box_notes(record)

    def encode(self, record: Mapping[str, Any]) -> Example | records.BadRecord:
        """The record's ``Example``, or a ``BadRecord`` marker (never raises on bad data)."""
        rid = records.as_text(record["id"])
        try:
            h_in, w_in = self._screen(record)
            image = records.decode_image(record)
            height, width = int(record["height"]), int(record["width"])
            if self.pixel_format == "uint8":
                pixels = self.raw_patches(image, (h_in, w_in))
            else:
                pixels = self.pixels(image, (h_in, w_in))
            prompt = records.as_text(record["prompt"])
            ids = self.token_ids(prompt, pixels.shape[0] // self.merge**2)
            if len(ids) > self.max_prompt_len:
                raise records.BadRecord(
                    rid,
                    f"prompt_too_long: {len(ids)} tokens > max_prompt_len={self.max_prompt_len}",
                )
            labels = tuple(records.text_list(record["labels"]))
            label_map = json.loads(records.as_text(record["label_map"]))
            lower = {k.lower(): int(v) for k, v in label_map.items()}
            return Example(
                record_id=rid,
                input_ids=ids,
                pixel_values=pixels,
                grid_thw=np.array([1, h_in // self.patch, w_in // self.patch], np.int32),
                boxes=np.asarray(record["boxes"], np.float32).reshape(-1, 4),
                classes=np.array([lower[x.lower()] for x in labels], np.int32),
                labels=labels,
                label_map=label_map,
                image_size=(height, width),
                input_size=(h_in, w_in),
                task=records.as_text(record["task"]),
                prompt=prompt,
                notes=records.box_notes(record),
            )
        except records.BadRecord as e:
            return e
        except Exception as e:  # anything unforeseen in one record must not stop the run
            return records.BadRecord(rid, f"encode_failed: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------ batching


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)}")


@dataclasses.dataclass(frozen=True)
class HostBatch:
    """This host's rows of one batch: static-shape arrays (see the module docstring) and the
    ragged host-side ground truth, row-aligned with the arrays (empty strings/dicts for
    padding rows)."""

    arrays: dict[str, np.ndarray]
    record_ids: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    label_maps: tuple[dict[str, int], ...]
    tasks: tuple[str, ...]
    prompts: tuple[str, ...]
    pad_id: int = 0

    def targets(self) -> list[Target]:
        """``Target`` per valid row (original-pixel boxes, sizes, map)."""
        a = self.arrays
        out = []
        for i in np.nonzero(a["valid"])[0]:
            n = int(a["gt_mask"][i].sum())
            out.append(
                Target(
                    a["gt_boxes"][i, :n],
                    list(self.labels[i]),
                    tuple(int(v) for v in a["image_size"][i]),
                    tuple(int(v) for v in a["input_size"][i]),
                    label_to_id=dict(self.label_maps[i]),
                )
            )
        return out


@dataclasses.dataclass(frozen=True)
class Collator:
    """Pads a list of ``Example`` to a ``HostBatch`` of ``rows`` rows with static shapes.

    Attributes:
      length_buckets: allowed prompt lengths T. patch_buckets: allowed patch counts S.
      max_instances: ground-truth width N; None (no upper bound, evaluation): the next power
        of two >= the batch's largest box count.
    """

    rows: int
    length_buckets: tuple[int, ...]
    patch_buckets: tuple[int, ...]
    max_instances: int | None
    feature_dim: int
    pad_id: int
    pixel_format: str = "float32"

    def __call__(self, examples: Sequence[Example]) -> HostBatch:
        b, n = self.rows, self.max_instances
        if n is None:
            n = 1 << (max([len(e.boxes) for e in examples] + [1]) - 1).bit_length()
        if len(examples) > b:
            raise ValueError(f"{len(examples)} examples for {b} rows")
        t = _bucket(
            max([len(e.input_ids) for e in examples], default=1),
            self.length_buckets,
            "prompt length",
        )
        s = _bucket(
            max([len(e.pixel_values) for e in examples], default=1),
            self.patch_buckets,
            "patch count",
        )
        a = {
            "input_ids": np.full((b, t), self.pad_id, np.int32),
            "attention_mask": np.zeros((b, t), np.int32),
            "image_grid_thw": np.zeros((b, 3), np.int32),
            "gt_boxes": np.zeros((b, n, 4), np.float32),
            "gt_classes": np.zeros((b, n), np.int32),
            "gt_mask": np.zeros((b, n), bool),
            "image_size": np.zeros((b, 2), np.int32),
            "input_size": np.zeros((b, 2), np.int32),
            "valid": np.zeros((b,), bool),
        }
        key = PIXEL_KEYS[self.pixel_format]
        if self.pixel_format == "uint8":
            a[key] = np.zeros((b, s, self.feature_dim // 2), np.uint8)
        else:
            a[key] = np.zeros((b, s, self.feature_dim), np.float32)
        for i, e in enumerate(examples):
            k, p, m = len(e.input_ids), len(e.pixel_values), len(e.boxes)
            a["input_ids"][i, t - k :] = e.input_ids  # left padding: prompts end together
            a["attention_mask"][i, t - k :] = 1
            a[key][i, :p] = e.pixel_values
            a["image_grid_thw"][i] = e.grid_thw
            a["gt_boxes"][i, :m] = e.boxes
            a["gt_classes"][i, :m] = e.classes
            a["gt_mask"][i, :m] = True
            a["image_size"][i] = e.image_size
            a["input_size"][i] = e.input_size
            a["valid"][i] = True
        pad = b - len(examples)
        return HostBatch(
            arrays=a,
            record_ids=tuple(e.record_id for e in examples) + ("",) * pad,
            labels=tuple(e.labels for e in examples) + ((),) * pad,
            label_maps=tuple(e.label_map for e in examples) + ({},) * pad,
            tasks=tuple(e.task for e in examples) + ("",) * pad,
            prompts=tuple(e.prompt for e in examples) + ("",) * pad,
            pad_id=self.pad_id,
        )


# ------------------------------------------------------------------------- grain: skip & pad


class _SkipBadIterator(grain.DatasetIterator):
    """Drops ``BadRecord`` markers, counting them by kind, and counts the notes of the records
    it passes; the counts are part of the state."""

    def __init__(self, parent: grain.DatasetIterator, shard_len: int):
        super().__init__(parent)
        self._counts: dict[str, int] = {}
        self._shard_len = shard_len

    def __next__(self) -> Example:
        run = 0  # consecutive bad records: a whole shard of them would loop forever
        while True:
            element = next(self._parent)
            if not isinstance(element, records.BadRecord):
                for kind in element.notes:
                    self._counts[kind] = self._counts.get(kind, 0) + 1
                return element
            run += 1
            if run > self._shard_len:
                raise RuntimeError(
                    f"data: all {self._shard_len} records of this host's shard are filtered or "
                    f"bad (last: {element.record_id}: {element.reason}); see data/* metrics"
                )
            self._counts[element.kind] = self._counts.get(element.kind, 0) + 1
            if element.kind in records.SELECTION_KINDS:
                logging.log_every_n(logging.INFO, "data: selected out %s (%s)", 1000,
                                    element.record_id, element.reason)  # fmt: skip
            else:
                logging.warning(
                    "data: skipped bad record %s: %s", element.record_id, element.reason
                )

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "counts": dict(self._counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counts = {str(k): int(v) for k, v in state["counts"].items()}


class _SkipBad(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, shard_len: int):
        super().__init__(parent)
        self._shard_len = shard_len

    def __iter__(self) -> _SkipBadIterator:
        return _SkipBadIterator(self._parent.__iter__(), self._shard_len)


class _PadToCountIterator(grain.DatasetIterator):
    """Yields exactly ``count`` batches: the parent's, then all-padding ones (finite epochs),
    so every host runs the same number of steps whatever its shard size and skips."""

    def __init__(self, parent: grain.DatasetIterator, count: int, empty: HostBatch):
        super().__init__(parent)
        self._count, self._empty, self._emitted, self._exhausted = count, empty, 0, False

    def __next__(self) -> HostBatch:
        if self._emitted >= self._count:
            raise StopIteration
        batch = self._empty
        if not self._exhausted:
            try:
                batch = next(self._parent)
            except StopIteration:
                self._exhausted = True
        self._emitted += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "emitted": self._emitted,
                "exhausted": self._exhausted}  # fmt: skip

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._emitted, self._exhausted = int(state["emitted"]), bool(state["exhausted"])


class _PadToCount(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, count: int, empty: HostBatch):
        super().__init__(parent)
        self._count, self._empty = count, empty

    def __iter__(self) -> _PadToCountIterator:
        return _PadToCountIterator(self._parent.__iter__(), self._count, self._empty)


# ------------------------------------------------------------------------------------ pipeline


class _HostRows(grain.MapDataset):
    """This host's rows of every global batch of `parent`: element i is parent element
    `k·B + p·b + j` for `k, j = divmod(i, b)` (B global rows, b = B / P per host, p this host).

    The global order is one sequence shared by all hosts, so batch k holds the same records in
    the same rows for any process count; the hosts' rows are disjoint and cover the sequence.
    """

    def __init__(self, parent: grain.MapDataset, batch: int, rows: int, index: int):
        super().__init__(parent)
        self._batch, self._rows, self._index = int(batch), int(rows), int(index)
        full, rest = divmod(len(parent), self._batch)
        self._len = full * self._rows + min(max(rest - self._index * self._rows, 0), self._rows)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        if not 0 <= index < self._len:
            raise IndexError(index)
        k, j = divmod(index, self._rows)
        return self._parent[k * self._batch + self._index * self._rows + j]

    def __str__(self) -> str:
        return f"HostRows(batch={self._batch}, rows={self._rows}, index={self._index})"


def open_source(
    c: ml_collections.ConfigDict, split: str | None = None, *, build_synthetic: bool = True
) -> Any:
    """The random-access tfds source of ``data.name/data.builder_config``.

    The datasets made from the config alone are built on first use when ``build_synthetic``
    (single-process runs): ``synthetic_shapes`` (from its seed) and ``coco_format`` (from the
    files in ``data.annotations``/``data.images``, ``builders.user_coco``). Multi-host runs
    build them beforehand (``python -m visionr1_jax.data.tfds_cli prepare --config=...``), and
    every other dataset with ``python -m visionr1_jax.data.tfds_cli build``.
    """
    if c.data_dir and fs.is_remote(c.data_dir):
        c = _stage_remote(c, build=build_synthetic)
        build_synthetic = False
    if c.name == "coco_format":
        return user_coco.open_source(c, split or c.split, build_missing=build_synthetic)
    name = f"{c.name}/{c.builder_config}"
    build = build_synthetic and c.name == "synthetic_shapes"
    try:
        return tfds.data_source(name, split=split or c.split, data_dir=c.data_dir, download=build)
    except Exception as e:
        raise FileNotFoundError(
            f"dataset {name} is not built under data_dir={c.data_dir!r} ({e}); build it with "
            f"python -m visionr1_jax.data.tfds_cli build {c.name} --config {c.builder_config} "
            "--imports visionr1_jax.data.builders --file_format array_record "
            "[--data_dir DIR] [--manual_dir DIR]"
        ) from e


DATA_CACHE_ENV = "VISIONR1_DATA_CACHE"
_COMPLETE = ".visionr1_complete"
_VERSION = re.compile(r"\d+\.\d+\.\d+")


def data_cache(data_dir: str) -> str:
    """The local folder that holds a remote ``data_dir``'s datasets: ``$VISIONR1_DATA_CACHE``
    (default ``~/.cache/visionr1_jax/data``) / the URL without its scheme."""
    root = os.environ.get(DATA_CACHE_ENV) or os.path.expanduser("~/.cache/visionr1_jax/data")
    return os.path.join(root, data_dir.split("://", 1)[1].strip("/"))


def _newest_version(data_dir: str, c: ml_collections.ConfigDict) -> str | None:
    """``name/config/version`` of the newest version of the data config's dataset under
    ``data_dir`` (local or remote), as tfds picks it; None when there is none."""
    folder = fs.join(data_dir, c.name, c.builder_config)
    found = [n for n in fs.listdir(folder) if _VERSION.fullmatch(n)] if fs.isdir(folder) else []
    found.sort(key=lambda v: tuple(map(int, v.split("."))))
    return f"{c.name}/{c.builder_config}/{found[-1]}" if found else None


def _stage_remote(c: ml_collections.ConfigDict, *, build: bool) -> ml_collections.ConfigDict:
    """The data config with its remote ``data_dir`` replaced by a local copy of the dataset.

    ArrayRecord's reader reads local files only, so a dataset under ``gs://...`` is copied
    once per host (and per version) into ``data_cache(data_dir)``, then read locally; a copy is
    used only when complete (a marker written last). A dataset the run builds itself
    (``build``: synthetic_shapes, coco_format, single process) and the bucket lacks is built
    locally and uploaded, ``dataset_info.json`` last (tfds writes it when a build is done).
    """
    local = c.copy_and_resolve_references()
    local.data_dir = data_cache(c.data_dir)
    if c.name == "coco_format":  # its config is made from the data section's files
        versions = [user_coco.builder(local).info.full_name]
    else:  # the newest version in the bucket, as tfds would pick it
        versions = [v for v in [_newest_version(c.data_dir, c)] if v]
    for relative in versions:
        target = os.path.join(local.data_dir, relative)
        if os.path.exists(os.path.join(target, _COMPLETE)):
            return local
        remote = fs.join(c.data_dir, relative)
        if fs.exists(fs.join(remote, "dataset_info.json")):
            logging.info("copying %s to %s (ArrayRecord reads local files)", remote, target)
            shutil.rmtree(target, ignore_errors=True)
            fs.copy_tree(remote, target)
            fs.write_text(os.path.join(target, _COMPLETE), remote)
            return local
    if not build:
        return c  # not built: open_source's message names the remote data_dir
    open_source(local, build_synthetic=True)  # builds it locally, then uploads it
    relative = versions[0] if versions else _newest_version(local.data_dir, c)
    target = os.path.join(local.data_dir, relative)
    remote = fs.join(c.data_dir, relative)
    fs.copy_tree(target, remote, last="dataset_info.json")  # tfds writes it when a build is done
    fs.write_text(os.path.join(target, _COMPLETE), remote)
    return local


def shard_indices(num_records: int, process_index: int, process_count: int) -> range:
    """The record indices of one host: a strided slice, disjoint across hosts, union = all."""
    return range(process_index, num_records, process_count)


def preflight(
    source: Any,
    indices: Sequence[int],
    encoder: Encoder,
    num_threads: int = 2,
    max_listed: int = 20,
) -> dict[str, int]:
    """Checks every record of ``indices`` (policy ``error``), before any training step.

    Returns:
      counts by kind of the records selected out (``records.SELECTION_KINDS``) and of the
      notes on kept ones (``records.NOTE_KINDS``).
    Raises:
      BadRecord: the first bad record in index order, with its id and reason; the message
        also lists up to ``max_listed`` others (all are logged). A failure no check foresaw
        is reported the same way, as ``encode_failed``, with the record id.
    """

    def one(i: int) -> records.BadRecord | tuple[str, ...]:
        record = source[i]
        try:
            return encoder.check(record)
        except records.BadRecord as e:
            return e
        except Exception as e:  # as Encoder.encode: a bad record, never an anonymous crash
            return records.BadRecord(
                records.as_text(record["id"]), f"encode_failed: {type(e).__name__}: {e}"
            )

    counts: dict[str, int] = {}
    bad: list[records.BadRecord] = []
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        for found in pool.map(one, indices):
            if not isinstance(found, records.BadRecord):
                for kind in found:
                    counts[kind] = counts.get(kind, 0) + 1
                continue
            if found.kind in records.SELECTION_KINDS:
                counts[found.kind] = counts.get(found.kind, 0) + 1
            else:
                bad.append(found)
    if bad:
        first = bad[0]
        others = "; ".join(f"{b.record_id}: {b.reason}" for b in bad[1:max_listed])
        more = f" [{len(bad)} bad records in all; also {others}]" if others else ""
        for b in bad:
            logging.error("data: bad record %s: %s", b.record_id, b.reason)
        raise records.BadRecord(first.record_id, first.reason + more)
    return counts


class InputPipeline:
    """Iterator of ``HostBatch`` for this host, with a checkpointable state.

    Usage::

        pipe = InputPipeline(config.data, processor)
        pipe.set_state(saved)            # optional: resume
        batch = next(pipe)               # HostBatch, this host's b = B / P rows
        arrays = pipe.global_arrays(batch, mesh)   # dict of jax.Array, B rows
        saved = pipe.get_state()         # bytes, store with the checkpoint (per host):
        save_state(step_dir, pipe)       # -> step_dir/data/process_{i}-of-{n}.json
    """

    def __init__(
        self,
        c: ml_collections.ConfigDict,
        processor: Any,
        *,
        source: Any | None = None,
        split: str | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            process_index, process_count = jax.process_index(), jax.process_count()
        config_lib.validate_data_config(c, num_processes=process_count)
        self.config = c
        self.process_index, self.process_count = process_index, process_count
        if source is None:
            source = open_source(c, split, build_synthetic=process_count == 1)
        self.source = source
        self.encoder = Encoder(processor, c)
        self.rows = c.batch_size // process_count
        indices = shard_indices(len(self.source), process_index, process_count)
        self.preflight_counts: dict[str, int] = {}
        if c.bad_data == "error":
            self.preflight_counts = preflight(self.source, indices, self.encoder, c.num_threads)
        patch_buckets = tuple(c.patch_buckets) or (self.encoder.max_patches,)
        length_buckets = tuple(c.length_buckets) or (int(c.max_prompt_len),)
        if max(patch_buckets) < self.encoder.max_patches:
            raise ValueError(
                f"data.patch_buckets: largest {max(patch_buckets)} < {self.encoder.max_patches} "
                f"patches of a max_pixels={c.max_pixels} image"
            )
        self.collate = Collator(
            rows=self.rows, length_buckets=length_buckets, patch_buckets=patch_buckets,
            max_instances=self.encoder.limits.max_instances,
            feature_dim=self.encoder.feature_dim, pad_id=self.encoder.pad_id,
            pixel_format=str(c.pixels),
        )  # fmt: skip

        # One global order (same seed on every host), then host p takes rows [p·b, (p+1)·b) of
        # each global batch: the global batch is the same whatever the process count.
        ds = grain.MapDataset.source(self.source)
        shard_len = math.ceil(len(ds) / process_count)
        if c.shuffle:
            ds = ds.shuffle(seed=int(c.seed))
        ds = ds.repeat(c.num_epochs)
        ds = _HostRows(ds, c.batch_size, self.rows, process_index)
        ds = ds.map(self.encoder.encode)
        threads = int(c.num_threads)
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, 2 * self.rows))
            if threads
            else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        )
        it = _SkipBad(it, max(1, shard_len))
        finite = c.num_epochs is not None
        it = it.batch(self.rows, drop_remainder=not finite, batch_fn=self.collate)
        if finite:
            # Every host: ceil(records · epochs / B) batches, the last ones padded.
            self.num_batches = math.ceil(len(self.source) * c.num_epochs / c.batch_size)
            it = _PadToCount(it, self.num_batches, self.collate([]))
        else:
            self.num_batches = None
        if c.prefetch:
            it = ThreadPrefetchIterDataset(it, prefetch_buffer_size=int(c.prefetch))
        self.shard_len = shard_len
        self.normalizer = self.encoder.normalizer
        self._agree_key = f"visionr1_jax/buckets/{next(_PIPELINES)}"
        self._agreed = 0  # batches whose buckets were agreed (`global_arrays`)
        self._dataset = it
        self._iterator = iter(it)

    def __iter__(self) -> InputPipeline:
        return self

    def __next__(self) -> HostBatch:
        return next(self._iterator)

    def global_arrays(self, batch: HostBatch, mesh: Any, **kw: Any) -> dict[str, Any]:
        """``global_arrays`` with this pipeline's pixel normaliser. On several processes each
        batch's buckets are agreed through the key-value store under this pipeline's keys (any
        thread may call it: `DevicePrefetch` does); every host calls it once per batch."""
        agree = (self._agree_key, self._agreed)
        self._agreed += 1
        return global_arrays(batch, mesh, normalizer=self.normalizer, agree=agree, **kw)

    def close(self) -> None:
        """Stops the prefetch threads."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def metrics(self, state: bytes | None = None) -> dict[str, int]:
        """Counters for the metrics writer, as of the last batch returned (prefetching never
        shows) or of a saved ``state``: ``data/skipped/<kind>`` (bad records),
        ``data/selected_out/<kind>`` (instance-count selection), ``data/noted/<kind>`` (kept
        records with boxes outside the image or empty), ``data/skipped_total`` and
        ``data/selected_out_total``."""
        raw = json.loads(state)["iterator"] if state is not None else self._iterator.get_state()
        counts = _find_counts(raw)
        out: dict[str, int] = {"data/skipped_total": 0, "data/selected_out_total": 0}
        for kind, n in counts.items():
            if kind in records.SELECTION_KINDS:
                group = "selected_out"
            elif kind in records.NOTE_KINDS:
                group = "noted"
            else:
                group = "skipped"
            out[f"data/{group}/{kind}"] = n
            if group != "noted":
                out[f"data/{group}_total"] += n
        return out

    def get_state(self) -> bytes:
        """This host's exact position (JSON bytes); restore with ``set_state``."""
        state = {
            "iterator": self._iterator.get_state(),
            "process_index": self.process_index,
            "process_count": self.process_count,
            "seed": int(self.config.seed),
            "rows": self.rows,
        }
        return json.dumps(state, default=_json_default).encode()

    def set_state(self, state: bytes) -> None:
        """Restores a position saved by ``get_state`` with the same data config and host."""
        s = json.loads(state)
        for key, mine in (("process_index", self.process_index),
                          ("process_count", self.process_count),
                          ("seed", int(self.config.seed)), ("rows", self.rows)):  # fmt: skip
            if s[key] != mine:
                raise ValueError(f"iterator state saved with {key}={s[key]}, running with {mine}")
        self._iterator.set_state(s["iterator"])


@dataclasses.dataclass(frozen=True)
class DeviceBatch:
    """A batch already on the devices: ``arrays`` (global, see ``global_arrays``), the host
    rows it came from, and the pipeline state right after it (for the checkpoint)."""

    arrays: dict[str, Any]
    host: HostBatch
    state: bytes


class DevicePrefetch:
    """Assembles the next ``size`` batches' global arrays in a background thread, so the
    transfer (and the on-device pixel normalisation) overlaps the train step.

    Usage::

        pipe = InputPipeline(config.data, processor); pipe.set_state(saved)   # optional
        batches = DevicePrefetch(pipe, mesh)
        batch = next(batches)       # DeviceBatch
        saved = batches.get_state() # position after the last batch returned
        first = batches.peek()      # the next batch, left for the next `next`
    """

    def __init__(self, pipe: InputPipeline, mesh: Any, size: int = 2, **kw: Any):
        self._pipe, self._mesh, self._kw = pipe, mesh, kw
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._state = pipe.get_state()
        self._peeked: DeviceBatch | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="device_prefetch")
        self._thread.start()

    def _run(self) -> None:
        try:
            for host in self._pipe:
                item = DeviceBatch(
                    self._pipe.global_arrays(host, self._mesh, **self._kw), host,
                    self._pipe.get_state(),
                )  # fmt: skip
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(StopIteration())
        except BaseException as e:  # re-raised in the consumer's thread
            self._queue.put(e)

    def __iter__(self) -> DevicePrefetch:
        return self

    def _get(self) -> DeviceBatch:
        item = self._queue.get()
        if isinstance(item, StopIteration):
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __next__(self) -> DeviceBatch:
        item, self._peeked = self._peeked or self._get(), None
        self._state = item.state
        return item

    def peek(self) -> DeviceBatch:
        """The batch the next `next` returns, without taking it (`get_state` and `metrics`
        stay at the last batch returned)."""
        if self._peeked is None:
            self._peeked = self._get()
        return self._peeked

    def get_state(self) -> bytes:
        """The pipeline position after the last batch returned (prefetched ones excluded)."""
        return self._state

    def metrics(self) -> dict[str, int]:
        return self._pipe.metrics(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pipe.close()


def state_path(directory: Any, process_index: int, process_count: int) -> Any:
    """Where one host's iterator state lives inside a checkpoint step directory."""
    return epath.Path(directory) / "data" / f"process_{process_index}-of-{process_count}.json"


def save_state(directory: Any, pipe: InputPipeline | DevicePrefetch) -> None:
    """Writes this host's iterator state next to the model checkpoint (local or gs://); every
    host writes its own file, as in grain's orbax handler."""
    path = state_path(directory, jax.process_index(), jax.process_count())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pipe.get_state())


def restore_state(directory: Any, pipe: InputPipeline) -> None:
    """Restores this host's position saved by ``save_state`` (before the first batch)."""
    pipe.set_state(state_path(directory, pipe.process_index, pipe.process_count).read_bytes())


def _find_counts(state: Any) -> dict[str, int]:
    """The ``_SkipBadIterator`` counters inside a nested grain iterator state."""
    if isinstance(state, dict):
        if "counts" in state and "parent" in state:
            return dict(state["counts"])
        for value in state.values():
            found = _find_counts(value)
            if found:
                return found
    return {}


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


@dataclasses.dataclass(frozen=True)
class PixelNormalizer:
    """Raw u8 patches -> the HF processor's ``pixel_values``, jittable (runs on the devices).

    ``pixel_values[..., c, t, :, :] = (patches[..., c, :, :] · rescale − mean[c]) / std[c]``
    for every temporal copy t, i.e. u8[..., S, 3·p·p] -> f32[..., S, 3·T·p·p].
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    rescale: float
    temporal: int

    def __call__(self, patches: Any) -> Any:
        *lead, s, f = patches.shape
        x = patches.astype(jnp.float32).reshape(*lead, s, 3, 1, f // 3)
        mean = jnp.asarray(self.mean, jnp.float32)[:, None, None]
        std = jnp.asarray(self.std, jnp.float32)[:, None, None]
        x = (x * jnp.float32(self.rescale) - mean) / std
        x = jnp.broadcast_to(x, (*lead, s, 3, self.temporal, f // 3))
        return x.reshape(*lead, s, 3 * self.temporal * (f // 3))


def global_arrays(
    batch: HostBatch,
    mesh: Any,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    normalizer: PixelNormalizer | None = None,
    agree: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The batch as global ``jax.Array``s with B = b·P rows, rows sharded over ``batch_axes``
    (those present in the mesh: the ``batch`` logical axis), other dims replicated.

    Every process passes its own rows; nothing is gathered on one host. ``pixel_patches``
    (uint8 mode) are normalised on the devices into ``pixel_values`` f32[B, S, F] with
    ``normalizer`` (``InputPipeline.normalizer``), so the result always has ``pixel_values``.
    """
    rows = sharding.rows_sharding(mesh, batch_axes)
    arrays = batch.arrays
    if jax.process_count() > 1:
        arrays = agree_on_buckets(batch, agree)
    out = {}
    for key, local in arrays.items():
        shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[key] = jax.make_array_from_process_local_data(rows, local, shape)
    if "pixel_patches" in out:
        if normalizer is None:
            raise ValueError("uint8 pixel_patches need the pipeline's PixelNormalizer")
        patches = out.pop("pixel_patches")
        out["pixel_values"] = _normalize_jit(normalizer, patches.sharding)(patches)
    return out


def agree_on_buckets(
    batch: HostBatch, agree: tuple[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Pads this host's arrays to the largest prompt length T, patch count S and ground-truth
    width N chosen by any host for this step, so that every host contributes rows of the same
    shape to the global arrays. Prompts stay left-padded, patches and boxes right-padded.

    The hosts exchange their choices through the key-value store under ``agree`` (a key
    prefix and the batch's index: `host.kv_allgather`, safe from any thread), or without it by
    an all-gather (an XLA collective: call it from the thread that launches the programs)."""
    a = dict(batch.arrays)
    pixel_key = "pixel_patches" if "pixel_patches" in a else "pixel_values"
    mine = np.array([a["input_ids"].shape[1], a[pixel_key].shape[1], a["gt_mask"].shape[1]])
    if agree is None:  # an XLA collective: only from the thread that runs the programs
        t, s, n = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 3).max(0)
    else:
        prefix, index = agree
        drop = f"{prefix}/{index - 1}" if index else None  # every host has read it by now
        rows = host.kv_allgather(f"{prefix}/{index}", [int(v) for v in mine], drop=drop)
        t, s, n = np.asarray(rows, np.int64).max(0)
    if n > mine[2]:  # N differs only without an upper selection bound (evaluation)
        extra = int(n - mine[2])
        for key in ("gt_boxes", "gt_classes", "gt_mask"):
            a[key] = np.pad(a[key], [(0, 0), (0, extra)] + [(0, 0)] * (a[key].ndim - 2))
    if t > mine[0]:
        extra = int(t - mine[0])
        a["input_ids"] = np.pad(a["input_ids"], ((0, 0), (extra, 0)), constant_values=batch.pad_id)
        a["attention_mask"] = np.pad(a["attention_mask"], ((0, 0), (extra, 0)))
    if s > mine[1]:
        a[pixel_key] = np.pad(a[pixel_key], ((0, 0), (0, int(s - mine[1])), (0, 0)))
    return a


@functools.cache
def _normalize_jit(normalizer: PixelNormalizer, out_sharding: Any) -> Any:
    return jax.jit(normalizer, out_shardings=out_sharding)
