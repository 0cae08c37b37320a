"""``refcoco``: RefCOCO / RefCOCO+ / RefCOCOg, one referring-expression prompt per reference.

Two on-disk forms are read; pickle is refused (``refs(unc).p`` must be converted first):

JSON (the ``refer`` toolkit layout with the refs converted to JSON)::

    <manual_dir>/<dataset>/instances.json        COCO images/annotations/categories
    <manual_dir>/<dataset>/refs(<split_by>).json  [{ref_id, ann_id, image_id, split,
                                                    sentences: [{sent, raw?}], ...}]
    <manual_dir>/images/<file_name>               COCO train2014 images (or train2014/)

Parquet: ``<manual_dir>/<dataset>/*.parquet`` with columns ``ref_id``, ``split`` (or the file
name starts with the split), ``sentences`` (list of str or of ``{sent}``), ``bbox`` (COCO
xywh), ``image`` (HF image) or ``file_name`` (read from the images dir), ``width``/``height``
(else read from the image header).

The prompt uses the reference's first sentence (``RefcocoConfig.sentence``); all sentences
are kept in ``meta``. Splits: ``train``, ``validation`` (``val``), ``test``, ``testA``,
``testB``. The target is the referred box, labelled with the expression.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import ClassVar

import numpy as np
from etils import epath
from PIL import Image

from visionr1_jax.data import records
from visionr1_jax.data.builders import base, coco_format, tabular

_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test",
           "testA": "testA", "testB": "testB"}  # fmt: skip


@dataclasses.dataclass(eq=False)
class RefcocoConfig(base.RecordBuilderConfig):
    """Attributes:
    dataset: folder under the manual dir (``refcoco``, ``refcoco+``, ``refcocog``).
    split_by: refs file variant (``unc``; ``umd``/``google`` for RefCOCOg).
    sentence: which sentence of a reference is the prompt (index, clipped).
    """

    dataset: str = "refcoco"
    split_by: str = "unc"
    sentence: int = 0


def _sentences(value) -> list[str]:
    out = []
    for s in value or []:
        if isinstance(s, dict):
            s = s.get("sent") or s.get("raw") or ""
        s = str(s).strip()
        if s:
            out.append(s)
    return out


def _xyxy(xywh) -> np.ndarray:
    x, y, w, h = (float(v) for v in xywh)
    return np.array([[x, y, x + w, y + h]], np.float32)


class Refcoco(base.RecordBuilder):
    """RefCOCO-family referring expressions as REC prompts (one per reference)."""

    VERSION = "1.0.0"
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    BUILDER_CONFIGS: ClassVar[list] = [
        RefcocoConfig(name="refcoco", dataset="refcoco", split_by="unc"),
        RefcocoConfig(name="refcoco+", dataset="refcoco+", split_by="unc"),
        RefcocoConfig(name="refcocog", dataset="refcocog", split_by="umd"),
    ]

    def _split_generators(self, dl_manager):
        c = self.builder_config
        root = dl_manager.manual_dir
        folder = root / c.dataset
        for path in folder.glob("*"):
            tabular.reject_pickle(path)
        refs_json = folder / f"refs({c.split_by}).json"
        if not refs_json.exists():
            refs_json = folder / "refs.json"
        if refs_json.exists():
            rows = self._rows_from_json(root, folder / "instances.json", refs_json)
        else:
            tables = tabular.find_tables(folder)
            if not tables:
                raise FileNotFoundError(
                    f"no refs({c.split_by}).json + instances.json nor parquet files in {folder}"
                )
            rows = self._rows_from_tables(root, tables)
        by_split: dict[str, list] = {}
        for row in rows:
            by_split.setdefault(row["split"], []).append(row)
        return {s: self._generate_examples(root, rs) for s, rs in sorted(by_split.items())}

    def _rows_from_json(self, root: epath.Path, instances: epath.Path, refs: epath.Path):
        data = json.loads(instances.read_text())
        images = {int(i["id"]): i for i in data["images"]}
        anns = {int(a["id"]): a for a in data["annotations"]}
        rows = []
        for ref in json.loads(refs.read_text()):
            ann = anns.get(int(ref["ann_id"]))
            img = images.get(int(ref["image_id"]), {})
            rows.append({
                "ref_id": int(ref["ref_id"]),
                "split": _SPLITS.get(str(ref["split"]), str(ref["split"])),
                "sentences": _sentences(ref.get("sentences")),
                "box": _xyxy(ann["bbox"]) if ann else np.zeros((0, 4), np.float32),
                "file_name": str(img.get("file_name", ref.get("file_name", ""))),
                "image": None,
                "width": int(img.get("width", 0)),
                "height": int(img.get("height", 0)),
                "image_id": int(ref["image_id"]),
            })  # fmt: skip
        return rows

    def _rows_from_tables(self, root: epath.Path, tables: list[epath.Path]):
        rows = []
        for path in tables:
            file_split = path.stem.split("-")[0].split("_")[0]
            for i, row in enumerate(tabular.iter_rows(path)):
                split = str(row.get("split") or file_split)
                sentences = _sentences(row.get("sentences") or row.get("answer"))
                rows.append({
                    "ref_id": int(row.get("ref_id", row.get("question_id", i))),
                    "split": _SPLITS.get(split, split),
                    "sentences": sentences,
                    "box": _xyxy(row["bbox"]),
                    "file_name": str(row.get("file_name") or ""),
                    "image": row.get("image"),
                    "width": int(row.get("width") or 0),
                    "height": int(row.get("height") or 0),
                    "image_id": int(row.get("image_id", -1)),
                })  # fmt: skip
        return rows

    def _generate_examples(self, root: epath.Path, rows: list[dict]):
        c = self.builder_config
        image_dirs = [root / "images", root / "train2014", root]
        for row in rows:
            image = tabular.image_bytes(row["image"], root) if row["image"] is not None else b""
            for d in image_dirs if not image and row["file_name"] else ():
                image = coco_format.read_bytes(d / row["file_name"])
                if image:
                    break
            width, height = row["width"], row["height"]
            if image and not (width and height):
                try:  # header only
                    width, height = Image.open(io.BytesIO(image)).size
                except Exception:  # corrupt bytes: flagged by the pipeline
                    pass
            sentences = row["sentences"]
            expression = sentences[min(c.sentence, len(sentences) - 1)] if sentences else ""
            rid = f"{c.dataset}/{row['split']}/{row['ref_id']}"
            yield rid, records.make_record(
                record_id=rid,
                image=image,
                width=width,
                height=height,
                task="rec" if expression else "unknown",
                template=c.template,
                expression=expression,
                boxes=row["box"],
                labels=[expression] * len(row["box"]),
                label_map={expression: 1} if expression else {},
                source=c.dataset,
                meta={"ref_id": row["ref_id"], "image_id": row["image_id"],
                      "file_name": row["file_name"], "sentences": sentences},
                prompt=None if expression else "",
            )  # fmt: skip
