"""The ``data`` section of a run config and its validation."""

from __future__ import annotations

import ml_collections

from visionr1_jax.data import templates

DATASETS = ("synthetic_shapes", "vision_r1_data", "coco_detection", "odinw", "refcoco")
POLICIES = ("skip", "error")


def data_config() -> ml_collections.ConfigDict:
    """Defaults of the data section; run configs include it as ``config.data``.

    Keys:
      name, builder_config: tfds dataset and builder config (``synthetic_shapes``/``detection``).
      data_dir: where the built dataset lives (None: tfds default ``~/tensorflow_datasets``).
      split, eval_split: tfds split names (slicing like ``train[:90%]`` is allowed).
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
      min_instances, max_instances: kept range of boxes per record (SPEC §6: 1..30); fewer is a
        selection, more is bad data.
      template: prompt template (``qwen25``/``griffon``); frame: answer coordinate frame
        (None: the template's default, ``qwen25_abs`` for Qwen2.5-VL).
      num_threads, prefetch: host threads decoding images, batches buffered ahead.
    """
    c = ml_collections.ConfigDict()
    c.name = "synthetic_shapes"
    c.builder_config = "detection"
    c.data_dir = ml_collections.config_dict.placeholder(str)
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
    if not isinstance(c.min_instances, int) or c.min_instances < 0:
        fail("min_instances", "must be an int >= 0")
    if not isinstance(c.max_instances, int) or c.max_instances < max(1, c.min_instances):
        fail("max_instances", "must be an int >= max(1, min_instances)")
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


def frame_of(c: ml_collections.ConfigDict) -> str:
    """The answer coordinate frame: ``data.frame`` or the template's default."""
    return c.frame or templates.DEFAULT_FRAME[c.template]
