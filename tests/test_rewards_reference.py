"""``rewards.score`` against the independent per-sample reference (tests/reward_reference.py).

2,000+ random cases per variant: 0–30 ground-truth boxes, 0–40 predictions, valid, invalid and
truncated JSON, unknown labels, negative samples, every schedule stage.
"""

import json
import zlib

import numpy as np
import pytest
import reward_reference as ref

from visionr1_jax import rewards
from visionr1_jax.rewards import schedule

CATEGORIES = ["cat", "dog", "traffic light", "person", "Ünïcode bird"]
CASES_PER_VARIANT = 2048
MALFORMED = [
    {"bbox_2d": [1, 2, 3], "label": "cat"},
    {"bbox_2d": "1,2,3,4", "label": "cat"},
    {"bbox": [1, 2, 3, 4], "label": "cat"},
    {"bbox_2d": [1, 2, 30, 40], "label": 7},
    {"bbox_2d": [1, 2, 30, 40]},
    {"bbox_2d": [1, True, 30, 40], "label": "cat"},
    [1, 2, 3, 4],
    "cat",
]


def _random_case(rng: np.random.Generator):
    """(completion, target) with a mix of the cases the reward must handle."""
    h, w = (int(x) for x in rng.integers(120, 900, 2))
    h_in, w_in = (max(28, round(x / 28) * 28) for x in (h * 0.9, w * 1.1))
    n = int(rng.integers(0, 31)) if rng.random() > 0.1 else 0
    cats = list(rng.choice(CATEGORIES, size=int(rng.integers(1, 6)), replace=False))
    xy = rng.uniform(0, [w * 0.8, h * 0.8], (n, 2))
    wh = rng.uniform(4, [w * 0.5, h * 0.5], (n, 2))
    gt = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
    labels = [str(rng.choice(cats)) for _ in range(n)]
    mapping = {c: k + 1 for k, c in enumerate(cats)}
    target = rewards.Target(gt, labels, (h, w), (h_in, w_in), mapping)

    m = int(rng.integers(0, 41))
    items = []
    sx, sy = w_in / w, h_in / h
    for _ in range(m):
        kind = rng.random()
        if n and kind < 0.55:  # a jittered ground-truth box, label sometimes off
            k = int(rng.integers(n))
            box = gt[k] * [sx, sy, sx, sy] + rng.normal(0, rng.choice([1, 6, 30]), 4)
            box = [int(v) for v in np.clip(box, -5, max(w_in, h_in) + 5)]
            label = labels[k]
            r = rng.random()
            if r < 0.1:
                label = "  " + label.upper() + " "
            elif r < 0.2:
                label = "unicorn"
        elif kind < 0.8:  # a random box in the input frame
            x1, y1 = int(rng.integers(0, w_in)), int(rng.integers(0, h_in))
            box = [x1, y1, x1 + int(rng.integers(-5, w_in // 2)), y1 + int(rng.integers(-5, 200))]
            label = str(rng.choice([*cats, "zebra"]))
        elif kind < 0.85:  # float coordinates
            box = [float(v) for v in rng.uniform(0, min(w_in, h_in), 4)]
            label = str(rng.choice(cats))
        elif kind < 0.9:  # malformed items
            items.append(MALFORMED[int(rng.integers(len(MALFORMED)))])
            continue
        else:  # inverted box
            box = [50, 50, 10, 10]
            label = "cat"
        items.append({"bbox_2d": box, "label": label})
    text = json.dumps(items)
    style = rng.random()
    if style < 0.55:
        text = f"```json\n{text}\n```"
    elif style < 0.7:
        text = f"```json\n{text}\n```"[: int(rng.integers(0, len(text) + 12))]  # truncated
    elif style < 0.75:
        text = "Sure! " + text  # prose around JSON: JSON fails, regex may recover
    elif style < 0.8:
        text = rng.choice(["", "no objects", "{}", "[]", "null", '{"bbox_2d": [1, 2, 3, 4]}'])
    return str(text), target


def _cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    return [_random_case(rng) for _ in range(count)]


STEPS = (0, 1499, 1500, 10_000)


@pytest.mark.parametrize("variant", ["official", "paper", "easyr1"])
@pytest.mark.parametrize("schedule_name", ["default", "official_adaptive", "paper"])
def test_score_matches_reference(variant, schedule_name):
    config = rewards.default_config(variant)
    if schedule_name != "default":
        config.stages = schedule.preset(schedule_name, switch_step=1500)
    # The full 2,048 cases for each variant's own schedule; 512 for the cross combinations.
    count = CASES_PER_VARIANT if schedule_name == "default" else 512
    cases = _cases(zlib.crc32(f"{variant}/{schedule_name}".encode()), count)
    stages = schedule.validate(config.stages)
    ties = 0
    for start in range(0, count, 256):
        chunk = cases[start : start + 256]
        step = STEPS[(start // 256) % len(STEPS)]
        out = rewards.score([c for c, _ in chunk], [t for _, t in chunk], step=step, config=config)
        st = [s for s in stages if s["start_step"] <= step][-1]
        stage = tuple(st[k] for k in schedule.THRESHOLD_KEYS)
        for k, (text, t) in enumerate(chunk):
            want = ref.reward(
                text, t.boxes, t.labels, t.label_to_id, t.image_size, t.input_size, stage, variant
            )
            assert out["format"][k] == want["format"], (text, want)
            got = {key: float(out[key][k]) for key in ("recall", "precision", "total")}
            if all(abs(got[key] - want[key]) <= 1e-5 for key in got):
                continue
            # A different optimal assignment (ties): the total matching cost must agree.
            ties += 1
            assert out["matched_cost"][k] == pytest.approx(want["min_cost"], rel=1e-5, abs=1e-3), (
                text,
                got,
                want,
            )
    assert ties <= count // 100, f"{ties} tie cases out of {count} is implausibly many"


def test_cases_cover_every_situation():
    """The generator really produces the situations the acceptance criterion lists."""
    cases = _cases(0, 2048)
    texts = [c for c, _ in cases]
    n_gt = np.array([len(t.boxes) for _, t in cases])
    parsed = [ref.parse(c) for c in texts]
    assert (n_gt == 0).sum() > 50 and n_gt.max() == 30
    assert max(len(p) for p in parsed) >= 30 and sum(len(p) == 0 for p in parsed) > 100
    assert sum(ref.format_official(c) == 0 for c in texts) > 100  # invalid / truncated JSON
    regex_recovered = sum(
        1 for c, p in zip(texts, parsed, strict=True) if p and ref._json(c.strip())[0] is False
    )
    assert regex_recovered > 20
    unknown = sum(
        1
        for c, (_, t) in zip(parsed, cases, strict=True)
        for _, label in c
        if isinstance(label, str) and label.strip().lower() not in t.label_to_id
    )
    assert unknown > 100
