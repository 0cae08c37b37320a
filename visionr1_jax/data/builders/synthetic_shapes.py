"""``synthetic_shapes``: coloured shapes with exact boxes, the embedded demo/test dataset.

The images are drawn by ``visionr1_jax.data.shapes.render`` (1..K shapes with exact pixel
boxes, a pure function of ``(seed, split, index)``: the same config always builds the same
bytes).

Configs: ``detection`` (one prompt per image listing all shape categories) and ``grounding``
(one prompt per image and category present). ``SyntheticShapes(config=ShapesConfig(...))``
gives other sizes and counts.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from visionr1_jax.data import records
from visionr1_jax.data.builders import base
from visionr1_jax.data.shapes import COLORS, SHAPES, ShapeParams, render

DEMO_COLORS = ("red", "green", "blue", "yellow", "purple")


@dataclasses.dataclass(eq=False)
class ShapesConfig(ShapeParams, base.RecordBuilderConfig):
    """What `shapes.render` draws (`ShapeParams`: image size, shape counts and scales,
    texture, overlap, seed, shape classes), and:

    task: ``detection`` or ``grounding``.
    num_train, num_validation, num_test: images per split (no ``test`` split when 0).
    sort_boxes: list each image's shapes left to right (by x1, then y1) instead of in drawing
      order, so that an answer's order follows from the image.
    The label ids of the shape classes stay ``SHAPES``'.
    """

    task: str = "detection"
    num_train: int = 4096
    num_validation: int = 256
    num_test: int = 0
    sort_boxes: bool = False


# The `make demo` experiment (configs/demo_cpu.py): one circle per image, five colours, plain
# backgrounds; `validation` chooses learning rates, `test` is evaluated (1,024 boxes: one box
# moves AP by < 0.1 point). One object, not 1-3: with 1-3 circles the demo's SFT reached
# matched IoU 0.29 in the time one circle reaches 0.58 (BENCHMARKS.md).
DEMO = ShapesConfig(
    name="demo",
    task="detection",
    min_shapes=1,
    max_shapes=1,
    min_scale=0.35,
    max_scale=0.75,
    texture=False,
    shapes=("circle",),
    colors=DEMO_COLORS,
    num_train=4096,
    num_validation=256,
    num_test=1024,
    description="the make demo experiment's data (in domain)",
)


class SyntheticShapes(base.RecordBuilder):
    """Synthetic coloured shapes with exact boxes (detection and grounding prompts)."""

    VERSION = "1.0.0"
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First version."}
    BUILDER_CONFIGS: ClassVar[list] = [
        ShapesConfig(name="detection", task="detection", description="one prompt per image"),
        ShapesConfig(
            name="grounding", task="grounding", description="one prompt per (image, category)"
        ),
        # The `make demo` experiment (configs/demo_cpu.py): one large circle per image on a
        # plain background, so that a tiny model's localisation moves within minutes on a CPU.
        ShapesConfig(
            name="localize",
            task="detection",
            min_shapes=1,
            max_shapes=1,
            min_scale=0.35,
            max_scale=0.75,
            texture=False,
            shapes=("circle",),
            num_train=2048,
            num_validation=256,
            description="one large circle per image (the make demo experiment until issue 26)",
        ),
        DEMO,
        # Its out-of-domain evaluation set (the paper's Table 2 in miniature): the same task on
        # what training never shows: the other three colours, textured backgrounds, sizes
        # from 20% to 90% of the side (training: 35-75%). Only `test` is evaluated.
        dataclasses.replace(
            DEMO,
            name="demo_ood",
            min_scale=0.2,
            max_scale=0.9,
            texture=True,
            colors=tuple(c for c in COLORS if c not in DEMO_COLORS),
            num_train=1,
            num_validation=1,
            description="the make demo experiment's out-of-domain evaluation set",
        ),
        # 1-3 circles per image (the multi-object variant measured for issue 26, left to right).
        dataclasses.replace(
            DEMO,
            name="demo_multi",
            max_shapes=3,
            min_scale=0.25,
            max_scale=0.5,
            max_overlap=0.0,
            sort_boxes=True,
            num_test=512,
            description="1-3 circles per image, listed left to right",
        ),
    ]

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        splits = {
            "train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation),
        }
        if c.num_test:
            splits["test"] = self._generate_examples("test", c.num_test)
        return splits

    def _generate_examples(self, split: str, num: int):
        c = self.builder_config
        label_map = {name: SHAPES.index(name) + 1 for name in c.shapes}
        for index in range(num):
            png, boxes, names, colors = render(c, split, index)
            if c.sort_boxes and len(boxes):
                order = np.lexsort((boxes[:, 1], boxes[:, 0]))
                boxes = boxes[order]
                names, colors = [names[i] for i in order], [colors[i] for i in order]
            common = dict(
                image=png, width=c.image_size, height=c.image_size, template=c.template,
                source="synthetic_shapes", label_map=label_map,
            )  # fmt: skip
            if c.task == "detection":
                rid = f"{split}/{index}"
                yield rid, records.make_record(
                    record_id=rid, task="detection", categories=list(c.shapes), boxes=boxes,
                    labels=names, meta={"index": index, "colors": colors}, **common,
                )  # fmt: skip
            else:
                for shape in sorted(set(names)):
                    keep = [i for i, name in enumerate(names) if name == shape]
                    rid = f"{split}/{index}/{shape}"
                    yield rid, records.make_record(
                        record_id=rid, task="grounding", categories=[shape], boxes=boxes[keep],
                        labels=[shape] * len(keep), label_map={shape: label_map[shape]},
                        meta={"index": index, "colors": [colors[i] for i in keep]},
                        **{k: v for k, v in common.items() if k != "label_map"},
                    )  # fmt: skip
