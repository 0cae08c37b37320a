"""The ``data`` section of a run config, its validation and the evaluation variant."""

from __future__ import annotations

import copy
import re

import ml_collections
from etils import epath

from visionr1_jax.data import templates
from visionr1_jax.sections.common import is_int

DATASETS = (
    "synthetic_shapes", "vision_r1_data", "coco_detection", "odinw", "refcoco", "coco_format",
)  # fmt: skip
POLICIES = ("skip", "error")
FILE_KEYS = ("annotations", "images")  # the data.name='coco_format' keys (per split paths)


def data_config() -> ml_collections.ConfigDict:
    """Defaults of the data section; run configs include it as ``config.data``.

    Keys:
      name, builder_config: tfds dataset and builder config (``synthetic_shapes``/``detection``).
      data_dir: where the built dataset lives (None: tfds default ``~/tensorflow_datasets``).
      annotations, images: the files of ``name='coco_format'``, the user's own COCO-format
        detection data, per split name: ``annotations.<split>`` a COCO instances JSON (its
        ``categories`` name the classes; every one is listed in each prompt),
        ``images.<split>`` the folder its ``file_name``s are relative to (unset: the JSON's own
        folder). Keys ``train``/``validation``/``test`` exist for command-line overrides; a
        config file may assign any dict, e.g. ``c.annotations = {"train": "/d/train.json",
        "minival": "/d/val.json"}``. Built on first use (``builder_config`` must stay
        ``detection``), see ``builders.user_coco``; unset (None) for every other dataset.
      split, eval_split: tfds split names (slicing like ``train[:90%]`` is allowed); an
        evaluation pipeline reads ``eval_split`` through ``eval_config``.
      batch_size: GLOBAL prompts per step B; each of P hosts loads B / P.
      seed: shuffling seed (same seed, same batches). shuffle: False keeps file order.
      num_epochs: None repeats forever (training); 1 for evaluation.
      min_pixels, max_pixels: image area bounds of the Qwen2-VL smart resize (SPEC §5).
      bad_data: ``skip`` (count, log the id, go on) or ``error`` (scan before training, stop
        at the first bad record with its id and reason).
      max_prompt_len: longest prompt in tokens (image tokens included); longer is bad data.
      length_buckets, patch_buckets: allowed padded prompt lengths T and per-image patch counts
        S (each a compile shape); empty: one bucket, max_prompt_len / the max_pixels maximum.
      pixels: ``uint8`` ships raw patches and normalises on the devices (8x less host work
        and transfer, same values); ``float32`` ships the HF processor's pixel_values.
      min_instances, max_instances: the instance-count selection of the training split: a
        record with N boxes is used iff min_instances <= N <= max_instances (SPEC §6 and the
        reference: 1..30; ``min_instances=0`` adds negative samples, ``max_instances=None``
        lifts the upper bound). Records outside are counted as selected out, never bad data.
        ``max_instances`` is also the ground-truth width N of the batches (None: per batch,
        the next power of two >= its largest count). ``eval_config`` turns the selection off.
      template: prompt template (``qwen25``/``griffon``); frame: answer coordinate frame
        (None: the template's default, ``qwen25_abs`` for Qwen2.5-VL).
      num_threads, prefetch: host threads decoding images, batches buffered ahead.
    """
    c = ml_collections.ConfigDict()
    c.name = "synthetic_shapes"
    c.builder_config = "detection"
    c.data_dir = ml_collections.config_dict.placeholder(str)
    for key in FILE_KEYS:
        c[key] = ml_collections.ConfigDict(
            {split: ml_collections.config_dict.placeholder(str)
             for split in ("train", "validation", "test")}
        )  # fmt: skip
    c.split = "train"
    c.eval_split = "validation"
    c.batch_size = 16
    c.seed = 0
    c.shuffle = True
    c.num_epochs = ml_collections.config_dict.placeholder(int)
    c.min_pixels = 3136
    c.max_pixels = 401408
    c.bad_data = "skip"
    c.max_prompt_len = 1024
    c.length_buckets = ()
    c.patch_buckets = ()
    c.pixels = "uint8"
    c.min_instances = 1
    c.max_instances = 30
    c.template = "qwen25"
    c.frame = ml_collections.config_dict.placeholder(str)
    c.num_threads = 2
    c.prefetch = 2
    return c


def validate_data_config(c: ml_collections.ConfigDict, *, num_processes: int = 1) -> None:
    """Raises ValueError naming the offending key (``data.<key>``) for any invalid value."""

    def fail(key: str, msg: str) -> None:
        raise ValueError(f"data.{key}: {msg} (got {c.get(key)!r})")

    if c.name not in DATASETS:
        fail("name", f"must be one of {DATASETS}")
    for key in ("split",):
        if not isinstance(c[key], str) or not c[key]:
            fail(key, "must be a non-empty split name")
    _validate_files(c)
    if not isinstance(c.batch_size, int) or c.batch_size <= 0:
        fail("batch_size", "must be a positive int")
    if c.batch_size % num_processes:
        fail("batch_size", f"must be divisible by the number of processes ({num_processes})")
    if not isinstance(c.seed, int) or not 0 <= c.seed < 2**32:
        fail("seed", "must be an int in [0, 2**32)")
    if c.num_epochs is not None and (not isinstance(c.num_epochs, int) or c.num_epochs <= 0):
        fail("num_epochs", "must be None (forever) or a positive int")
    if not isinstance(c.min_pixels, int) or c.min_pixels < 28 * 28:
        fail("min_pixels", "must be an int >= 784 (one 28x28 merged patch)")
    if not isinstance(c.max_pixels, int) or c.max_pixels < c.min_pixels:
        fail("max_pixels", "must be an int >= min_pixels")
    if c.bad_data not in POLICIES:
        fail("bad_data", f"must be one of {POLICIES}")
    if not is_int(c.min_instances) or c.min_instances < 0:
        fail("min_instances", "must be an int >= 0 (0 keeps negative samples)")
    if c.max_instances is not None and (
        not is_int(c.max_instances) or c.max_instances < max(1, c.min_instances)
    ):
        fail(
            "max_instances",
            f"must be None (no upper bound) or an int >= max(1, min_instances="
            f"{c.min_instances}); a smaller one would select no record with boxes",
        )
    if not isinstance(c.max_prompt_len, int) or c.max_prompt_len <= 0:
        fail("max_prompt_len", "must be a positive int")
    for key in ("length_buckets", "patch_buckets"):
        values = tuple(c[key])
        if not all(isinstance(v, int) and v > 0 for v in values):
            fail(key, "must be a tuple of positive ints (empty: one bucket)")
    if any(v % 4 for v in c.patch_buckets):
        fail("patch_buckets", "must be multiples of merge_size**2 = 4")
    if tuple(c.length_buckets) and max(c.length_buckets) < c.max_prompt_len:
        fail("length_buckets", "largest must be >= max_prompt_len")
    if c.pixels not in ("uint8", "float32"):
        fail("pixels", "must be 'uint8' or 'float32'")
    if c.template not in templates.TEMPLATES:
        fail("template", f"must be one of {templates.TEMPLATES}")
    if c.frame is not None and c.frame not in templates.FRAMES:
        fail("frame", f"must be None or one of {templates.FRAMES}")
    if not isinstance(c.num_threads, int) or c.num_threads < 0:
        fail("num_threads", "must be an int >= 0")
    if not isinstance(c.prefetch, int) or c.prefetch < 0:
        fail("prefetch", "must be an int >= 0")


def split_files(c: ml_collections.ConfigDict, key: str) -> dict[str, str]:
    """``data.<key>`` (``annotations`` or ``images``) as {split: path}, unset entries left out."""
    value = c.get(key)
    if value is None:
        return {}
    items = value.items() if hasattr(value, "items") else ()
    return {str(split): path for split, path in items if path is not None}


def split_bases(split: str) -> list[str]:
    """The split names a tfds split expression reads: ``train[:90%]+validation`` ->
    ``["train", "validation"]``."""
    return [m.group(1) for m in (re.match(r"\s*(\w+)", p) for p in split.split("+")) if m]


def _validate_files(c: ml_collections.ConfigDict) -> None:
    """The ``coco_format`` keys: required there (existing files and folders, one annotation
    file per split read), an error anywhere else (they would be silently ignored)."""
    for key in FILE_KEYS:
        value = c.get(key)
        if value is not None and not hasattr(value, "items"):
            raise ValueError(f"data.{key}: must map split names to paths (got {value!r})")
    annotations, images = split_files(c, "annotations"), split_files(c, "images")
    if c.name != "coco_format":
        for key, paths in (("annotations", annotations), ("images", images)):
            if paths:
                raise ValueError(
                    f"data.{key}: has no effect with data.name={c.name!r} (only 'coco_format' "
                    f"reads it); unset it or set data.name='coco_format' (got {paths!r})"
                )
        return
    if not annotations:
        raise ValueError(
            "data.annotations: data.name='coco_format' needs a COCO instances JSON per split, "
            "e.g. --config.data.annotations.train=/data/mine/train.json (got none)"
        )
    if c.builder_config != "detection":
        raise ValueError(
            "data.builder_config: coco_format builds 'detection' prompts (one per image, every "
            f"category of the JSON listed) (got {c.builder_config!r})"
        )
    for split, path in annotations.items():
        if not re.fullmatch(r"\w+", split):
            raise ValueError(f"data.annotations: split name {split!r} must be a word (\\w+)")
        if not isinstance(path, str) or not path or not epath.Path(path).is_file():
            raise ValueError(f"data.annotations.{split}: no such file: {path!r}")
    for split, path in images.items():
        if split not in annotations:
            raise ValueError(
                f"data.images.{split}: split {split!r} has no data.annotations.{split} "
                f"(annotated splits: {sorted(annotations)})"
            )
        if not isinstance(path, str) or not path or not epath.Path(path).is_dir():
            raise ValueError(f"data.images.{split}: no such folder: {path!r}")
    for key in ("split", "eval_split"):
        value = c.get(key)
        for base in split_bases(value) if isinstance(value, str) else ():
            if base not in annotations:
                raise ValueError(
                    f"data.{key}: split {base!r} has no annotation file: set "
                    f"data.annotations.{base} (annotated splits: {sorted(annotations)}; "
                    f"got {value!r})"
                )


def eval_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The data config of an evaluation pass over ``c.eval_split``: a copy of ``c`` that
    keeps every record (``min_instances=0``, ``max_instances=None``: COCO val2017 has images
    with no and with more than 30 instances, and dropping them would score a subset), reads
    the split once in file order (``num_epochs=1``, ``shuffle=False``). Everything else
    (template, pixel bounds, buckets, bad-data policy) is the run's.

    Usage::

        pipe = InputPipeline(eval_config(config.data), processor)
    """
    if not isinstance(c.eval_split, str) or not c.eval_split:
        raise ValueError(f"data.eval_split: must be a non-empty split name (got {c.eval_split!r})")
    e = copy.deepcopy(c)
    e.split = c.eval_split
    e.num_epochs = 1
    e.shuffle = False
    e.min_instances = 0
    e.max_instances = None
    return e


def frame_of(c: ml_collections.ConfigDict) -> str:
    """The answer coordinate frame: ``data.frame`` or the template's default."""
    return c.frame or templates.DEFAULT_FRAME[c.template]
