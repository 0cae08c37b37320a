"""``coco_detection``: COCO instances JSON + image directory, one detection prompt per image.

Manual directory layout (the official one)::

    <manual_dir>/annotations/instances_train2017.json
    <manual_dir>/annotations/instances_val2017.json
    <manual_dir>/train2017/000000000009.jpg ...
    <manual_dir>/val2017/...

Splits ``train`` (train2017) and ``validation`` (val2017); a split whose annotation file is
absent is not built. The label map uses the COCO category ids (>= 1; 0 stays background), so
evaluation can hand predictions straight to pycocotools.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from visionr1_jax.data import records
from visionr1_jax.data.builders import base, coco_format

_SPLITS = {"train": "train2017", "validation": "val2017"}


@dataclasses.dataclass(eq=False)
class CocoConfig(base.RecordBuilderConfig):
    """Attributes:
    prompt_categories: ``all`` lists every category in the prompt (evaluation protocol),
      ``present`` only those with a box in the image (a training option).
    """

    prompt_categories: str = "all"


class CocoDetection(base.RecordBuilder):
    """COCO 2017 detection as Vision-R1 detection prompts."""

    VERSION = "1.0.0"
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place annotations/instances_{train,val}2017.json and the train2017/, val2017/ image "
        "directories in the manual directory."
    )
    BUILDER_CONFIGS: ClassVar[list] = [
        CocoConfig(name="all", prompt_categories="all", description="all categories listed"),
        CocoConfig(name="present", prompt_categories="present", description="present ones"),
    ]

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        out = {}
        for split, name in _SPLITS.items():
            ann = root / "annotations" / f"instances_{name}.json"
            if ann.exists():
                out[split] = self._generate_examples(ann, root / name)
        if not out:
            raise FileNotFoundError(f"no annotations/instances_*2017.json under {root}")
        return out

    def _generate_examples(self, ann_path, image_dir):
        c = self.builder_config
        if c.prompt_categories not in ("all", "present"):
            raise ValueError(
                f"prompt_categories must be 'all' or 'present', got {c.prompt_categories!r}"
            )
        categories, images = coco_format.load_coco(ann_path)
        for img in images:
            labels = [coco_format.label_of(int(k), categories) for k in img.category_ids]
            present = {int(k) for k in img.category_ids if int(k) in categories}
            # An image without known categories (a negative) still lists the full set.
            keep = (
                sorted(categories)
                if c.prompt_categories == "all" or not present
                else sorted(present)
            )
            rid = f"{ann_path.stem}/{img.image_id}"
            yield (
                rid,
                records.make_record(
                    record_id=rid,
                    image=coco_format.read_bytes(image_dir / img.file_name),
                    width=img.width,
                    height=img.height,
                    task="detection",
                    template=c.template,
                    categories=[categories[k] for k in keep],
                    boxes=img.boxes,
                    labels=labels,
                    label_map={categories[k]: k for k in keep},
                    source="coco_detection",
                    meta={"image_id": img.image_id, "file_name": img.file_name},
                ),
            )
