"""``coco_format``: the user's own COCO-format detection data, from the run config alone.

The files are named in the data config (``data.name='coco_format'``, see
``config.data_config``)::

    data.annotations = {"train": "/data/mine/train.json", "validation": "/data/mine/val.json"}
    data.images = {"train": "/data/mine/images", "validation": "/data/mine/images"}

Each split is one COCO instances JSON (``images``, ``annotations`` with ``bbox`` in xywh
pixels, ``categories``) and the folder its ``file_name``s are relative to (default: the JSON's
folder). One detection prompt per image lists every category of the JSON (in category-id
order; names repeated under several ids are listed once); the targets are the image's boxes
in original pixels, labelled with their category names. Crowd annotations (``iscrowd=1``) are
ignore regions and left out; an image without annotations is a negative sample (selected out
by ``data.min_instances=1`` in training, kept by evaluation). Label ids are the JSON's
category ids, shifted up when the JSON uses id 0 (Roboflow exports do), since 0 is padding.

Bad data goes through the input pipeline's checks (``records``, ``data.bad_data``), as for
``coco_detection``: a file missing under the image folder (``missing_image``, logged at build
time with its path), undecodable bytes (``corrupt_image``), a decoded size that differs from
the JSON's (``bad_size``), an unknown category id (``unknown_category``), a negative box width
or height (``degenerate_box``); boxes sticking out of the image or of zero area are kept and
counted (``data/noted/...``). A split none of whose images is found, or a file that is not
COCO JSON, is a build error naming the file. Image sizes missing from the JSON are read from
the image headers.

Building. The tfds builder config is made from the data config (``builder_config``): its name
is ``files_<hash>``, the hash of each split's name, annotation file CONTENTS and absolute
image folder (and the prompt template), so two datasets never share a build and an edited
annotation file is built anew (images replaced in place under the same JSON are not noticed:
delete the build, whose path ``build`` logs). ``pipeline.open_source`` builds it on first use
in a single-process run, into ``data.data_dir``; a multi-process run expects it built
beforehand, once, into a ``data_dir`` every host reads, with the run's own config::

    python -m visionr1_jax.data.tfds_cli prepare --config=configs/coco_format_example.py:... \\
        --config.data.data_dir=gs://bucket/tensorflow_datasets

(or ``user_coco.build(config.data)`` from Python). Every host still reads the annotation
files to compute the name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from typing import Any, ClassVar

import ml_collections
from absl import logging
from etils import epath
from PIL import Image

from visionr1_jax.data import config as config_lib
from visionr1_jax.data import records
from visionr1_jax.data.builders import base, coco_format

NAME = "coco_format"
_MAX_LISTED = 5  # missing files named in the build log


@dataclasses.dataclass(eq=False)
class CocoFormatConfig(base.RecordBuilderConfig):
    """Attributes:
    files: ``(split, annotation JSON, image folder)`` per split, absolute paths.
    """

    files: tuple[tuple[str, str, str], ...] = ()


class CocoFormat(base.RecordBuilder):
    """A COCO-format detection dataset named by the run config (one prompt per image)."""

    VERSION = "1.0.0"
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}

    def _split_generators(self, dl_manager):
        del dl_manager
        files = self.builder_config.files if self.builder_config else ()
        if not files:
            raise ValueError(
                "coco_format is built from a run config: python -m visionr1_jax.data.tfds_cli "
                "prepare --config=... (or user_coco.build(config.data))"
            )
        return {split: self._generate_examples(split, ann, images) for split, ann, images in files}

    def _generate_examples(self, split: str, ann: str, image_dir: str):
        template = self.builder_config.template
        categories, images = load(ann)
        offset = max(0, 1 - min(categories))  # label ids >= 1 (0 pads gt_classes)
        label_map: dict[str, int] = {}
        for k in sorted(categories):
            label_map.setdefault(categories[k], k + offset)
        folder = epath.Path(image_dir)
        missing = []
        for img in images:
            path = folder / img.file_name
            image = coco_format.read_bytes(path)
            if not image:
                missing.append(str(path))
            width, height = img.width, img.height
            if image and (width <= 0 or height <= 0):
                width, height = _header_size(image, (width, height))
            rid = f"{split}/{img.image_id}/{img.file_name}"
            yield rid, records.make_record(
                record_id=rid, image=image, width=width, height=height, task="detection",
                template=template, categories=list(label_map), boxes=img.boxes,
                labels=[coco_format.label_of(int(k), categories) for k in img.category_ids],
                label_map=label_map, source=NAME,
                meta={"image_id": img.image_id, "file_name": img.file_name,
                      "category_ids": [int(k) for k in img.category_ids]},
            )  # fmt: skip
        if missing and len(missing) == len(images):
            raise FileNotFoundError(
                f"coco_format: none of the {len(images)} images of {ann} is under {image_dir} "
                f"(first: {missing[0]}); set data.images.{split} to the folder the JSON's "
                "file_name entries are relative to"
            )
        if missing:
            logging.warning(
                "coco_format: %d of %d images of split %s missing (bad records, "
                "data.bad_data decides): %s%s",
                len(missing), len(images), split, ", ".join(missing[:_MAX_LISTED]),
                " ..." if len(missing) > _MAX_LISTED else "",
            )  # fmt: skip


def load(path: str) -> tuple[dict[int, str], list[coco_format.CocoImage]]:
    """``coco_format.load_coco`` with the structural checks a hand-made file needs.

    Raises:
      ValueError naming the file: not JSON, not COCO instances (missing fields, a bbox that is
        not 4 numbers), no categories, no images, or an image id used twice.
    """
    try:
        categories, images = coco_format.load_coco(path)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{path}: not a COCO instances JSON ({type(e).__name__}: {e}); expected "
            "'images' [{id, file_name, width, height}], 'annotations' [{image_id, "
            "category_id, bbox: [x, y, w, h]}] and 'categories' [{id, name}]"
        ) from None
    if not categories:
        raise ValueError(f"{path}: no 'categories' (they name the classes of the prompts)")
    if not images:
        raise ValueError(f"{path}: no 'images'")
    ids = [img.image_id for img in images]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})[:_MAX_LISTED]
        raise ValueError(f"{path}: image ids used more than once: {twice}")
    return categories, images


def _header_size(image: bytes, fallback: tuple[int, int]) -> tuple[int, int]:
    """(width, height) from the image header; ``fallback`` when it cannot be read (the
    pipeline then reports the record as ``bad_size`` or ``corrupt_image``)."""
    try:
        return Image.open(io.BytesIO(image)).size
    except Exception:  # PIL raises many types for bad bytes
        return fallback


def resolve_files(c: ml_collections.ConfigDict) -> tuple[tuple[str, str, str], ...]:
    """``(split, annotation JSON, image folder)`` per split of ``data.annotations``, with
    absolute paths (local ones) and each folder defaulting to its JSON's."""
    images = config_lib.split_files(c, "images")
    out = []
    for split, ann in sorted(config_lib.split_files(c, "annotations").items()):
        ann = _absolute(ann)
        folder = _absolute(images[split]) if split in images else str(epath.Path(ann).parent)
        out.append((split, ann, folder))
    return tuple(out)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; cached per (path, size, mtime) within a process."""
    del size, mtime_ns  # the cache key
    return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (read again only when its size or mtime changed)."""
    if "://" in path:
        stat = epath.Path(path).stat()
        return _digest(path, int(stat.length), int(stat.mtime * 1e9))
    stat = os.stat(path)
    return _digest(path, stat.st_size, stat.st_mtime_ns)


def builder_config(c: ml_collections.ConfigDict) -> CocoFormatConfig:
    """The tfds builder config of ``data.annotations``/``data.images``, named ``files_<hash>``
    (module docstring); the data config must be valid (``validate_data_config``)."""
    files = resolve_files(c)
    key = json.dumps(
        {
            "version": CocoFormat.VERSION,
            "template": c.template,
            "splits": [[split, file_digest(ann), folder] for split, ann, folder in files],
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    described = "; ".join(f"{split}: {ann} (images {folder})" for split, ann, folder in files)
    return CocoFormatConfig(
        name=f"files_{digest}", files=files, template=c.template, description=described
    )


def builder(c: ml_collections.ConfigDict) -> CocoFormat:
    """The builder of the data config's files, under ``data.data_dir`` (built or not)."""
    return CocoFormat(config=builder_config(c), data_dir=c.data_dir)


def build(c: ml_collections.ConfigDict) -> CocoFormat:
    """Builds the data config's dataset unless it is built already; returns the builder.

    Run it on ONE process (``python -m visionr1_jax.data.tfds_cli prepare --config=...`` does).
    """
    config_lib.validate_data_config(c)
    b = builder(c)
    if b.is_prepared():
        logging.info("coco_format: %s is built at %s", b.builder_config.name, b.data_path)
        return b
    logging.info(
        "coco_format: building %s (%s) into %s",
        b.builder_config.name, b.builder_config.description, b.data_path,
    )  # fmt: skip
    b.download_and_prepare()
    counts = {split: info.num_examples for split, info in b.info.splits.items()}
    logging.info("coco_format: built %s: %s records", b.data_path, counts)
    return b


def open_source(c: ml_collections.ConfigDict, split: str, *, build_missing: bool) -> Any:
    """The random-access source of ``split`` (slicing allowed); built first when missing and
    ``build_missing`` (single process), else a FileNotFoundError with the build command."""
    b = builder(c)
    if not b.is_prepared():
        if not build_missing:
            raise FileNotFoundError(
                f"dataset coco_format/{b.builder_config.name} ({b.builder_config.description})"
                f" is not built under data_dir={c.data_dir!r} (expected at {b.data_path}); a "
                "multi-process run does not build it: build it once, on one machine, into a "
                "data_dir every host reads, with the run's own config and overrides: "
                "python -m visionr1_jax.data.tfds_cli prepare --config=<run config> "
                "[--config.data.data_dir=DIR]"
            )
        b = build(c)
    return b.as_data_source(split=split)
