"""Prompt templates and coordinate frames (SPEC §1, §6).

Every record carries its task (``detection``, ``grounding``, ``rec``), the categories named in
its prompt and, for referring expressions, the expression. The prompt text is rendered from
those with the template of the target model, so the same data serves Qwen2.5-VL and Griffon.

Coordinate frames of the answers (the reward parser in ``visionr1_jax.rewards.parse`` uses the
same names):

- ``qwen25_abs``: integer pixels of the resized model input (``h_in = grid_h·14``,
  ``w_in = grid_w·14`` from the processor's ``image_grid_thw``);
- ``rel1000``: integers in [0, 1000] relative to the image (Qwen2-VL, Qwen3-VL);
- ``norm01``: floats in [0, 1] with 3 decimals (Griffon).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np

from visionr1_jax.sections.reward import FRAMES

TASKS = ("detection", "grounding", "rec")
TEMPLATES = ("qwen25", "griffon")

# (template, task) -> format string. Detection lists categories, grounding names one category,
# REC names one referring expression.
_PROMPTS = {
    ("qwen25", "detection"): (
        "Locate every item from the category list in the image and output the coordinates in "
        "JSON format. The category set includes {query}."
    ),
    ("qwen25", "grounding"): (
        "Locate every {query} in the image and output the coordinates in JSON format."
    ),
    (
        "qwen25",
        "rec",
    ): "Locate every {query} in the image and output the coordinates in JSON format.",
    ("griffon", "detection"): (
        "Examine the image for any objects from the category set. Report the coordinates of "
        "each detected object. The category set includes {query}."
    ),
    ("griffon", "grounding"): "Locate the exact position of {query} in the picture, if you can.",
    ("griffon", "rec"): (
        "Can you point out {query} in the image and provide the coordinates of its location?"
    ),
}

DEFAULT_FRAME = {"qwen25": "qwen25_abs", "griffon": "norm01"}

CATEGORY_SEPARATOR = ", "

# Griffon prompts as found in Vision-R1-Data's `problem` column (optionally preceded by an
# `<image>` placeholder and whitespace).
_GRIFFON_PATTERNS = (
    (
        "detection",
        re.compile(
            r"^Examine the image for any objects from the category set\. Report the coordinates "
            r"of each detected object\. The category set includes (?P<q>.+?)\.?$",
            re.S,
        ),
    ),
    (
        "grounding",
        re.compile(
            r"^Locate the exact position of (?P<q>.+?) in the picture, if you can\.?$", re.S
        ),
    ),
    (
        "rec",
        re.compile(
            r"^Can you point out (?P<q>.+?) in the image and provide the coordinates of its "
            r"location\?$",
            re.S,
        ),
    ),
)
_IMAGE_PLACEHOLDER = re.compile(r"<image>")


def _check(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(allowed)}")


def render_prompt(
    template: str, task: str, categories: Sequence[str] = (), expression: str = ""
) -> str:
    """The user prompt text for one record.

    Args:
      template: ``qwen25`` or ``griffon``.
      task: ``detection`` (lists ``categories``), ``grounding`` (names ``categories[0]``) or
        ``rec`` (names ``expression``).
      categories: category names of the prompt, in prompt order.
      expression: the referring expression (REC only).
    """
    _check("template", template, TEMPLATES)
    _check("task", task, TASKS)
    if task == "detection":
        if not categories:
            raise ValueError("a detection prompt needs at least one category")
        query = CATEGORY_SEPARATOR.join(categories)
    elif task == "grounding":
        if len(categories) != 1:
            raise ValueError(f"a grounding prompt names one category, got {list(categories)}")
        query = categories[0]
    else:
        if not expression:
            raise ValueError("a REC prompt needs a referring expression")
        query = expression
    return _PROMPTS[(template, task)].format(query=query)


def parse_griffon_prompt(problem: str) -> tuple[str, list[str], str]:
    """Recognises a Griffon-template prompt.

    Returns:
      ``(task, categories, expression)``; ``categories`` is the split category list for
      detection, ``[category]`` for grounding and ``[]`` for REC, ``expression`` is set for REC.

    Raises:
      ValueError: the text matches none of the three Griffon templates.
    """
    text = _IMAGE_PLACEHOLDER.sub("", problem).strip()
    for task, pattern in _GRIFFON_PATTERNS:
        match = pattern.match(text)
        if match:
            query = match.group("q").strip()
            if task == "detection":
                cats = [c.strip() for c in query.split(",") if c.strip()]
                return task, cats, ""
            if task == "grounding":
                return task, [query], ""
            return task, [], query
    raise ValueError(f"not a Griffon-template prompt: {problem[:120]!r}")


def rewrite_griffon_prompt(problem: str, template: str) -> str:
    """Rewrites a Griffon-template prompt into ``template`` (SPEC §6)."""
    task, categories, expression = parse_griffon_prompt(problem)
    return render_prompt(template, task, categories, expression)


def boxes_to_frame(
    boxes: np.ndarray,
    frame: str,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Converts xyxy boxes from original-image pixels to a model's answer frame.

    Args:
      boxes: f32[N, 4] xyxy in original image pixels.
      frame: one of ``FRAMES``.
      image_size: (H, W) of the original image.
      input_size: (h_in, w_in) of the resized model input; required for ``qwen25_abs``.

    Returns:
      f32[N, 4] in the frame (integers for ``qwen25_abs`` and ``rel1000``, 3 decimals for
      ``norm01``).
    """
    _check("frame", frame, FRAMES)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = image_size
    if frame == "qwen25_abs":
        if input_size is None:
            raise ValueError("frame 'qwen25_abs' needs the resized input size (h_in, w_in)")
        h_in, w_in = input_size
        scale = np.array([w_in / w, h_in / h, w_in / w, h_in / h])
        out = np.round(boxes * scale)
    elif frame == "rel1000":
        out = np.round(boxes / np.array([w, h, w, h]) * 1000.0)
    else:
        out = np.round(boxes / np.array([w, h, w, h]), 3)
    return out.astype(np.float32)


def format_answer(
    boxes: np.ndarray,
    labels: Sequence[str],
    frame: str,
    image_size: tuple[int, int],
    input_size: tuple[int, int] | None = None,
) -> str:
    """The reference answer text (SFT target), a fenced JSON list in the frame's coordinates.

    Args:
      boxes: f32[N, 4] xyxy in original image pixels.
      labels: N label strings.
    """
    coords = boxes_to_frame(boxes, frame, image_size, input_size)
    items = []
    for box, label in zip(coords, labels, strict=True):
        values = [round(float(v), 3) for v in box] if frame == "norm01" else [int(v) for v in box]
        items.append({"bbox_2d": values, "label": label})
    return "```json\n" + json.dumps(items) + "\n```"


def sft_answer(
    boxes: np.ndarray,
    labels: Sequence[str],
    frame: str,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
) -> str:
    """One SFT answer as the reference's collate writes it (`visionr1_jax.sft`'s docstring):
    a fenced JSON list, one object per line, `qwen25_abs` coordinates truncated toward zero.

    Args:
      boxes: f32[N, 4] xyxy in original image pixels.
      labels: N label strings.
      frame: the answer frame (`templates.FRAMES`).
      image_size: original (H, W); input_size: resized model input (h_in, w_in).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(labels) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    if frame == "qwen25_abs":
        (h, w), (h_in, w_in) = image_size, input_size
        coords = (boxes / np.array([w, h, w, h]) * np.array([w_in, h_in, w_in, h_in])).astype(int)
        values = coords.tolist()
    else:
        coords = boxes_to_frame(boxes, frame, image_size, input_size)
        cast = (lambda v: round(float(v), 3)) if frame == "norm01" else (lambda v: int(v))
        values = [[cast(v) for v in box] for box in coords]
    items = [
        f'{{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}], "label": {json.dumps(label)}}}'
        for b, label in zip(values, labels, strict=True)
    ]
    return "```json\n[\n\t" + ",\n\t".join(items) + "\n]\n```"
