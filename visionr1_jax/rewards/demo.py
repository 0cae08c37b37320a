"""Reward demo: scores hand-written answers and prints each term (``make demo``).

python -m visionr1_jax.rewards.demo --config=configs/rewards_demo.py:official
"""

from __future__ import annotations

import json
import sys

import numpy as np

from visionr1_jax import config_lib, rewards

# One 640×480 image resized to the 644×476 model input (grid 46×34 patches of 14 px).
IMAGE_SIZE, INPUT_SIZE = (480, 640), (476, 644)
GT_BOXES = [[40.0, 60.0, 200.0, 220.0], [300.0, 100.0, 420.0, 300.0], [480.0, 320.0, 600.0, 460.0]]
GT_LABELS = ["cat", "dog", "dog"]


def _to_input(box):
    sx, sy = INPUT_SIZE[1] / IMAGE_SIZE[1], INPUT_SIZE[0] / IMAGE_SIZE[0]
    return [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)]


def _answer(items) -> str:
    body = json.dumps([{"bbox_2d": b, "label": lab} for b, lab in items])
    return f"```json\n{body}\n```"


def examples() -> list[tuple[str, str, rewards.Target]]:
    """(name, completion, target) rows covering the reward's cases."""
    target = rewards.Target(GT_BOXES, GT_LABELS, IMAGE_SIZE, INPUT_SIZE)
    negative = rewards.Target(np.zeros((0, 4)), [], IMAGE_SIZE, INPUT_SIZE, {"cat": 1, "dog": 2})
    exact = [(_to_input(b), lab) for b, lab in zip(GT_BOXES, GT_LABELS, strict=True)]
    shifted = [([x + 12 for x in b], lab) for b, lab in exact]
    perfect = _answer(exact)
    return [
        ("perfect", perfect, target),
        ("shifted 12px", _answer(shifted), target),
        ("missing one", _answer(exact[:2]), target),
        ("duplicate box", _answer([*exact, exact[0]]), target),
        ("wrong labels", _answer([(b, "zebra") for b, _ in exact]), target),
        ("truncated", perfect[: len(perfect) * 2 // 3], target),
        ("garbage", "I think there is a cat.", target),
        ("negative, empty", "```json\n[]\n```", negative),
        ("negative, boxes", perfect, negative),
    ]


def run(config) -> dict[str, np.ndarray]:
    """Scores ``examples()`` under ``config.reward`` at ``config.step`` and prints a table."""
    rows = examples()
    out = rewards.score(
        [c for _, c, _ in rows], [t for _, _, t in rows], step=config.step, config=config.reward
    )
    r = config.reward
    schedule = f"schedule={r.schedule} switch_step={r.switch_step}"
    print(f"reward variant={r.variant} {schedule} step={config.step}")
    print(f"{'answer':<18}{'format':>8}{'recall':>8}{'precision':>11}{'total':>8}")
    for k, (name, _, _) in enumerate(rows):
        print(
            f"{name:<18}{out['format'][k]:>8.3f}{out['recall'][k]:>8.3f}"
            f"{out['precision'][k]:>11.3f}{out['total'][k]:>8.3f}"
        )
    return out


def main(argv: list[str]) -> None:
    spec = "configs/rewards_demo.py"
    for arg in argv:
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
    run(config_lib.validate(config_lib.load_config(spec)))


if __name__ == "__main__":
    main(sys.argv[1:])
