"""``odinw``: COCO-format ODINW sets, one grounding prompt per (image, category present).

This is the paper's ODINW protocol (SPEC §7): every category with at least one box in an
image becomes its own query "Locate every {category} ...", whose targets are all boxes of
that category. Manual directory layout (as distributed with GLIP, Roboflow exports)::

    <manual_dir>/<Set>/[<variant>/]{train,valid,test}/_annotations.coco.json  (+ its images)

Every annotation file found is read; ``OdinwConfig.sets`` restricts the sets. The set name is
the path from the manual directory to the split folder (``AerialMaritimeDrone/large``).
Splits: ``train``, ``validation`` (``valid``), ``test``. Record ids are
``<set>/<split>/<image_id>/<category_id>``; ``meta`` carries the set's own ids for evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from visionr1_jax.data import records
from visionr1_jax.data.builders import base, coco_format, tabular

_SPLITS = {"train": "train", "valid": "validation", "val": "validation", "test": "test"}
ANNOTATION_FILE = "_annotations.coco.json"


@dataclasses.dataclass(eq=False)
class OdinwConfig(base.RecordBuilderConfig):
    """Attributes:
    sets: set names to build (empty: every set found).
    """

    sets: tuple[str, ...] = ()


class Odinw(base.RecordBuilder):
    """ODINW object-detection-in-the-wild sets as per-category grounding prompts."""

    VERSION = "1.0.0"
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the ODINW sets (<Set>/[<variant>/]{train,valid,test}/_annotations.coco.json "
        "with their images) in the manual directory."
    )
    BUILDER_CONFIGS: ClassVar[list] = [OdinwConfig(name="grounding", description="all sets found")]

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        found: dict[str, list] = {}
        for ann in tabular.walk_files(root):
            if ann.name != ANNOTATION_FILE:
                continue
            split = _SPLITS.get(ann.parent.name)
            set_name = str(ann.parent.parent.relative_to(root))
            if split is None or (
                self.builder_config.sets and set_name not in self.builder_config.sets
            ):
                continue
            found.setdefault(split, []).append((set_name, ann))
        if not found:
            raise FileNotFoundError(f"no */{{train,valid,test}}/{ANNOTATION_FILE} under {root}")
        return {split: self._generate_examples(files, split) for split, files in found.items()}

    def _generate_examples(self, files, split: str):
        template = self.builder_config.template
        for set_name, ann in files:
            categories, images = coco_format.load_coco(ann)
            for img in images:
                present = sorted({int(k) for k in img.category_ids})
                if not present:
                    continue
                image = coco_format.read_bytes(ann.parent / img.file_name)
                for cat in present:
                    keep = img.category_ids == cat
                    name = coco_format.label_of(cat, categories)
                    rid = f"{set_name}/{split}/{img.image_id}/{cat}"
                    yield rid, records.make_record(
                        record_id=rid,
                        image=image,
                        width=img.width,
                        height=img.height,
                        task="grounding",
                        template=template,
                        categories=[name],
                        boxes=img.boxes[keep],
                        labels=[name] * int(keep.sum()),
                        # An id missing from the set's categories has no label-map entry.
                        label_map={name: 1} if cat in categories else {},
                        source=f"odinw/{set_name}",
                        meta={"image_id": img.image_id, "category_id": cat,
                              "file_name": img.file_name},
                    )  # fmt: skip
