"""``vision_r1_data``: a local copy of ``JefferyZhan/Vision-R1-Data`` (SPEC §6).

Place the released parquet (or HF ``save_to_disk`` arrow) files in the manual directory, any
layout. Columns: ``image`` (HF image: ``{"bytes", "path"}``), ``problem`` (Griffon-template
prompt), ``solution`` (JSON ``[[category, [[x1, y1, x2, y2], ...]], ...]`` in original pixels),
``width``, ``height``, ``num_instances``, ``target_id_maps`` (JSON ``{category: id}``, 0 is
background).

Prompts are rewritten to the config's template. Every row is written, whatever its
``num_instances``: the RL recipe's 1..30 range is the input pipeline's selection
(``data.min_instances``/``data.max_instances``), so negatives (0) and crowded images (> 30)
stay available. A prompt in no known template is kept with task ``unknown`` so the pipeline
reports it as bad data.
Record ids are ``<file path relative to the manual dir>:<row>``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import numpy as np

from visionr1_jax.data import records, templates
from visionr1_jax.data.builders import base, tabular


@dataclasses.dataclass(eq=False)
class VisionR1DataConfig(base.RecordBuilderConfig):
    """The template is the only option (every row is written)."""


def parse_solution(solution: str) -> tuple[np.ndarray, list[str]]:
    """``[[category, [[x1,y1,x2,y2], ...]], ...]`` (or one flat box) -> (f32[N, 4], labels[N])."""
    boxes, labels = [], []
    for category, coords in json.loads(solution):
        arr = np.asarray(coords, np.float32).reshape(-1, 4)
        boxes.append(arr)
        labels += [str(category)] * len(arr)
    return (np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)), labels


class VisionR1Data(base.RecordBuilder):
    """The Vision-R1 RL data (COCO, ODINW, V3Det, RefCOCO, VG) with rewritten prompts."""

    VERSION = "1.1.0"
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First version.",
        "1.1.0": "Every row is written (the 1..30 num_instances range moved to the pipeline).",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download JefferyZhan/Vision-R1-Data (parquet files) and place them in the manual "
        "directory."
    )
    BUILDER_CONFIGS: ClassVar[list] = [
        VisionR1DataConfig(name="qwen25", template="qwen25", description="Qwen2.5-VL prompts"),
        VisionR1DataConfig(name="griffon", template="griffon", description="Griffon prompts"),
    ]

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        for path in tabular.walk_files(root):
            tabular.reject_pickle(path)
        files = tabular.find_tables(root)
        if not files:
            raise FileNotFoundError(f"no *.parquet or *.arrow files under {root}")
        return {"train": self._generate_examples(root, files)}

    def _generate_examples(self, root, files):
        c = self.builder_config
        for path in files:
            rel = str(path.relative_to(root))
            for row_index, row in enumerate(tabular.iter_rows(path)):
                n = int(row["num_instances"])
                rid = f"{rel}:{row_index}"
                boxes, labels = parse_solution(row["solution"])
                problem = str(row["problem"])
                try:
                    task, categories, expression = templates.parse_griffon_prompt(problem)
                    prompt = None
                except ValueError:
                    task, categories, expression, prompt = "unknown", [], "", problem
                yield (
                    rid,
                    records.make_record(
                        record_id=rid,
                        image=tabular.image_bytes(row["image"], root),
                        width=int(row["width"]),
                        height=int(row["height"]),
                        task=task,
                        template=c.template,
                        categories=categories,
                        expression=expression,
                        boxes=boxes,
                        labels=labels,
                        label_map=json.loads(row["target_id_maps"]),
                        source="vision_r1_data",
                        meta={"file": rel, "row": row_index, "num_instances": n},
                        prompt=prompt,
                    ),
                )
