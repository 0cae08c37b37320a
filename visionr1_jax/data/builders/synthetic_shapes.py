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

from visionr1_jax.data import records
from visionr1_jax.data.builders import base
from visionr1_jax.data.shapes import SHAPES, ShapeParams, render


@dataclasses.dataclass(eq=False)
class ShapesConfig(ShapeParams, base.RecordBuilderConfig):
    """What `shapes.render` draws (`ShapeParams`: image size, shape counts and scales,
    texture, overlap, seed, shape classes), and:

    task: ``detection`` or ``grounding``.
    num_train, num_validation: images per split.
    The label ids of the shape classes stay ``SHAPES``'.
    """

    task: str = "detection"
    num_train: int = 4096
    num_validation: int = 256


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
            description="the make demo experiment's data",
        ),
    ]

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {
            "train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation),
        }

    def _generate_examples(self, split: str, num: int):
        c = self.builder_config
        label_map = {name: SHAPES.index(name) + 1 for name in c.shapes}
        for index in range(num):
            png, boxes, names, colors = render(c, split, index)
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
