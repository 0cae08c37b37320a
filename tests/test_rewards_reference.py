"""``rewards.score`` against the oracle written from the reference's code (reward_reference.py).

Random cases: 0–30 ground-truth boxes, 0–40 predictions; valid, invalid and truncated JSON;
coordinates written as numbers, floats, digit strings, booleans and junk; unknown and
non-string labels; negative samples; integer boxes whose overlap equals ξ0 or a map bound
exactly; every schedule stage; the three frames, both matchers and the ``max_boxes`` cap.

Every case must agree on the format flag, the number of predictions, their class ids and
pixel boxes, the matched cost and the three terms. A difference in the terms is accepted only
with an explanation the oracle confirms:

* our assignment differs from scipy's: it must be optimal too (for the greedy matcher: a
  greedy pick order) under the oracle's costs, and the oracle re-scores *our* assignment;
* a matched overlap of non-integer boxes lies within a few float32 ulps of a threshold: the
  oracle with that overlap just below, on, or just above the threshold must reproduce ours.
"""

import json
import zlib

import numpy as np
import pytest
import reward_reference as ref

from visionr1_jax import rewards

CATEGORIES = ["cat", "dog", "traffic light", "person", "Ünïcode bird"]
ARABIC_INDIC = "٠١٢٣٤٥٦٧٨٩"  # Unicode decimal digits: int("٣") == 3
STEPS = (0, 1499, 1500, 10_000)
U = 2.0**-24  # float32 unit roundoff
# The terms: ours sums ≤ 30 float32 mapped overlaps in [-1, 1] and divides (error ≤ 29·U ≈
# 1.7e-6 of the mean), the oracle sums the same float32 values in float64; overlaps of
# non-integer boxes may differ by a few ulps (≤ 2.4e-7) between XLA (FMA) and numpy. 1e-5.
TERM_TOL = 1e-5
MALFORMED = [
    {"bbox_2d": [1, 2, 3], "label": "cat"},
    {"bbox_2d": "1,2,3,4", "label": "cat"},
    {"bbox": [1, 2, 3, 4], "label": "cat"},
    {"bbox_2d": [1, 2, 30, 40], "label": 7},
    {"bbox_2d": [1, 2, 30, 40], "label": None},
    {"bbox_2d": [1, 2, 30, 40]},
    {"bbox_2d": None, "label": "cat"},
    [1, 2, 3, 4],
    "cat",
]
JUNK = ["9.5", "", "ten", "0x10", "1e3", None, [1], {"x": 1}, float("nan"), float("inf")]
HUGE = [10**30, 1e300, "9" * 40, -(10**20)]  # int() accepts them; beyond max_coord: dropped


def _odd(rng, value):
    """``value`` (an integer) written in a form ``int()`` accepts and maps back to it."""
    s = str(value)
    kind = int(rng.integers(7))
    if kind == 0:
        return s
    if kind == 1:
        return " " + s + "\n"
    if kind == 2:
        return "+" + s if value >= 0 else s
    if kind == 3 and abs(value) >= 10:
        return s[:-1] + "_" + s[-1]  # "12_3"
    if kind == 4:
        return "".join(ARABIC_INDIC[int(ch)] if ch.isdigit() else ch for ch in s)
    if kind == 5:  # a float that truncates toward zero to value (int(-0.5) == 0)
        frac = float(rng.uniform(0.01, 0.99))
        return value + frac if value > 0 else value - frac if value < 0 else -frac
    if value in (0, 1):
        return bool(value)
    return s


def _odd01(rng, value):
    """A norm01 coordinate in a form ``float()`` accepts."""
    kind = int(rng.integers(4))
    if kind == 0:
        return str(value)
    if kind == 1:
        return " " + str(value) + " "
    if kind == 2 and value in (0.0, 1.0):
        return bool(value)
    return value


class _Frame:
    """Model frame ↔ pixels for the generator (its own arithmetic; tests compare exactly)."""

    def __init__(self, frame, image_size, input_size, tie):
        self.frame, self.tie = frame, tie
        height, width = image_size
        if frame == "qwen25_abs":
            ext_h, ext_w = input_size
        else:
            ext_h = ext_w = 1000 if frame == "rel1000" else 1
        self.scale = np.array([ext_w / width, ext_h / height] * 2)  # pixels → model
        self.extent = (ext_w, ext_h)

    def model(self, pixel_box):
        box = np.asarray(pixel_box, float) * self.scale
        if self.frame != "norm01":
            return [round(float(v)) for v in box]
        if self.tie:  # dyadic: exact in binary and in its decimal repr (images of 256, 512)
            return [round(v * 1024) / 1024 for v in box]
        return [round(v, 3) for v in box]


def _random_case(rng, frame="qwen25_abs"):
    """(completion, target) with a mix of the situations the reward must handle.

    A third of the cases are tie-friendly: integer ground truth with heights multiple of 20 on
    an image whose pixels are exact in the model frame, and predictions with an overlap of
    exactly 0.5, 0.75 or 0.9 with one ground-truth box.
    """
    tie = rng.random() < 0.35
    if frame == "qwen25_abs":
        h, w = (int(x) for x in rng.integers(120, 900, 2))
        if tie:
            h_in, w_in = h, w
        else:
            h_in, w_in = (max(28, round(x / 28) * 28) for x in (h * 0.9, w * 1.1))
    else:
        sizes = (500, 1000) if frame == "rel1000" else (256, 512)
        h, w = (int(rng.choice(sizes)) for _ in range(2)) if tie else rng.integers(120, 900, 2)
        h, w = int(h), int(w)
        h_in, w_in = h, w
    fr = _Frame(frame, (h, w), (h_in, w_in), tie)
    n = int(rng.integers(0, 31)) if rng.random() > 0.1 else 0
    cats = list(rng.choice(CATEGORIES, size=int(rng.integers(1, 6)), replace=False))
    if tie:
        x1 = rng.integers(0, w // 2, n)
        y1 = rng.integers(0, h // 2, n)
        bw = rng.integers(4, max(5, w // 3), n)
        bh = 20 * rng.integers(1, max(2, h // 60), n)
        gt = np.stack([x1, y1, np.minimum(x1 + bw, w), y1 + bh], 1).astype(float)
        gt[:, 3] = np.where(gt[:, 3] > h, gt[:, 1] + 20, gt[:, 3])
    else:
        xy = rng.uniform(0, [w * 0.8, h * 0.8], (n, 2))
        wh = rng.uniform(4, [w * 0.5, h * 0.5], (n, 2))
        gt = np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1)
    labels = [str(rng.choice(cats)) for _ in range(n)]
    mapping = {c: k + 1 for k, c in enumerate(cats)}
    target = rewards.Target(gt, labels, (h, w), (h_in, w_in), mapping)

    ext_w, ext_h = fr.extent
    odd = _odd01 if frame == "norm01" else _odd
    items = []
    for _ in range(int(rng.integers(0, 41))):
        kind = rng.random()
        k = int(rng.integers(n)) if n else 0
        label = labels[k] if n else str(rng.choice(cats))
        r = rng.random()
        if r < 0.1:
            label = "  " + label.upper() + " "
        elif r < 0.18:
            label = "unicorn"
        if n and kind < 0.4:  # a jittered ground-truth box
            box = gt[k] + rng.normal(0, rng.choice([1, 6, 30]), 4)
            box = fr.model(np.clip(box, -5, max(w, h) + 5))
        elif n and tie and kind < 0.55:  # overlap exactly 0.5, 0.75 or 0.9 (contained box)
            x1, y1, x2, y2 = gt[k]
            ratio = float(rng.choice([0.5, 0.75, 0.9]))
            box = fr.model([x1, y1, x2, y1 + ratio * (y2 - y1)])
        elif kind < 0.7:  # a random box in the model frame
            x1, y1 = rng.uniform(0, ext_w), rng.uniform(0, ext_h)
            box = [
                x1,
                y1,
                x1 + rng.uniform(-0.005, 0.5) * ext_w,
                y1 + rng.uniform(-0.005, 0.25) * ext_h,
            ]
            box = [round(v, 3) for v in box] if frame == "norm01" else [int(v) for v in box]
            label = str(rng.choice([*cats, "zebra"]))
        elif n and kind < 0.8:  # a ground-truth box written with odd coordinates
            box = [odd(rng, v) for v in fr.model(gt[k])]
        elif kind < 0.84:  # float coordinates (truncated in integer frames)
            box = [float(v) for v in rng.uniform(-1, min(ext_w, ext_h), 4)]
        elif kind < 0.88 and n:  # one coordinate int() rejects, or beyond max_coord
            box = fr.model(gt[k])
            box[int(rng.integers(4))] = (JUNK + HUGE)[int(rng.integers(len(JUNK) + len(HUGE)))]
        elif kind < 0.92:
            items.append(MALFORMED[int(rng.integers(len(MALFORMED)))])
            continue
        elif kind < 0.96:  # inverted box
            box = [50, 50, 10, 10] if frame != "norm01" else [0.5, 0.5, 0.1, 0.1]
        else:  # booleans
            box = [False, False, True, True]
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
        text = str(rng.choice(["", "no objects", "{}", "[]", "null", '{"bbox_2d": [1, 2, 3, 4]}']))
    return text, target


def _cases(seed, count, frame="qwen25_abs"):
    rng = np.random.default_rng(seed)
    return [_random_case(rng, frame) for _ in range(count)]


def _terms_agree(out, k, want):
    # recall = f(TP / N): TP sums 0, 1 and ξ0 exactly, one correctly rounded division: equal.
    return (
        float(out["recall"][k]) == want["recall"]
        and abs(float(out["precision"][k]) - want["precision"]) <= TERM_TOL
        and abs(float(out["total"][k]) - want["total"]) <= TERM_TOL
    )


def _check(cases, config, *, step, stage, seen):
    """Scores ``cases`` and compares each with the oracle (see the module docstring)."""
    texts, targets = [c for c, _ in cases], [t for _, t in cases]
    out = rewards.score(texts, targets, step=step, config=config)
    _, _, parsed = rewards.prepare(texts, targets, config)
    kw = dict(
        variant=config.variant,
        stage=stage,
        frame=config.frame,
        max_boxes=config.max_boxes,
        max_coord=config.max_coord,
        matcher=config.matcher,
    )
    for k, (text, t) in enumerate(cases):
        want = ref.reward(text, t, **kw)
        why = (text, t, want)
        # Parsing: format flag, count, class ids, pixel boxes, dropped count.
        assert out["format"][k] == want["format"], why
        m = len(want["labels"])
        assert out["num_pred"][k] == m and parsed.valid[k].sum() == m, why
        assert parsed.labels[k, :m].tolist() == want["labels"], why
        # x·W/w_in rounded once to float32 by both (two float64 routes): ≤ 1 float32 ulp apart.
        np.testing.assert_allclose(parsed.boxes[k, :m], want["boxes"], rtol=2 * U, err_msg=text)
        total = len(ref.extract(text, config.frame, 10**9, config.max_coord))
        assert out["num_dropped"][k] == max(total - config.max_boxes, 0), why
        # Matching: ours must be optimal (or a greedy order) under the oracle's costs.
        ours = [(i, int(j)) for i, j in enumerate(out["pred_to_gt"][k][:m]) if j >= 0]
        assert len(ours) == len(want["pairs"]) and out["num_matched"][k] == len(ours), why
        if sorted(ours) != sorted(want["pairs"]):
            cost = want["cost_matrix"]
            scale = float(np.abs(cost).max())
            if config.matcher == "greedy":
                # A cost evaluated by XLA and by numpy differs by ≤ 4 ulps: 8 ulps of max|C|.
                assert ref.is_greedy_order(cost, ours, 8 * U * scale), why
            else:
                mine = float(sum(cost[p].astype(np.float64) for p in ours))
                # ≤ 4 ulps per cost between evaluations plus the solver's float32 reduced
                # costs, a few ulps of max|C| per augmentation: 16 ulps of max|C| per pair.
                assert mine <= want["min_cost"] + 16 * U * scale * len(ours) + 1e-6, why
            want = ref.reward(text, t, **kw, assignment=ours)
            seen["alternative"] += 1
        # Ours sums ≤ 30 float32 costs (≤ 29 ulps of Σ|c|), each within ≤ 4 ulps of numpy's.
        abs_sum = float(sum(abs(float(want["cost_matrix"][p])) for p in want["pairs"]))
        assert abs(float(out["matched_cost"][k]) - want["cost"]) <= 40 * U * abs_sum + 1e-6, why
        bounds = {float(np.float32(s)) for s in stage if 0 < s < 1}
        seen["tie"] += sum(float(q) in bounds for q in want["q"])
        if _terms_agree(out, k, want):
            continue
        alternatives = [
            ref.reward(text, t, **kw, assignment=want["pairs"], q_override=o)
            for o in ref.rounding_alternatives(want, stage)
        ]
        assert any(_terms_agree(out, k, alt) for alt in alternatives), (
            {key: float(out[key][k]) for key in ("recall", "precision", "total")},
            why,
        )
        seen["rounding"] += 1


def _run(config, cases, schedule_name):
    seen = {"alternative": 0, "tie": 0, "rounding": 0}
    for start in range(0, len(cases), 256):
        step = STEPS[(start // 256) % len(STEPS)]
        stage = ref.thresholds(schedule_name, step, config.switch_step or 1500)
        _check(cases[start : start + 256], config, step=step, stage=stage, seen=seen)
    return seen


# Each variant with its own schedule (None; SPEC §4 table) and with each other preset.
OWN_SCHEDULE = {"official": "off", "paper": "paper", "easyr1": "off"}
COMBINATIONS = [
    (variant, schedule)
    for variant in ("official", "paper", "easyr1")
    for schedule in (None, "off", "official_adaptive", "paper")
    if schedule != OWN_SCHEDULE[variant]
]


@pytest.mark.parametrize("variant, schedule_name", COMBINATIONS)
def test_score_matches_reference(variant, schedule_name):
    config = rewards.default_config(variant, schedule=schedule_name)
    assert config.schedule == (schedule_name or OWN_SCHEDULE[variant])
    # 1,024 cases for each variant's own schedule; 256 for each cross combination.
    count = 1024 if schedule_name is None else 256
    cases = _cases(zlib.crc32(f"{variant}/{schedule_name}".encode()), count)
    seen = _run(config, cases, config.schedule)
    assert seen["tie"] > (20 if schedule_name is None else 4), seen  # exact ties were scored
    print(seen)


@pytest.mark.parametrize("frame", ["rel1000", "norm01"])
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_frames_match_reference(frame, variant):
    config = rewards.default_config(variant)
    config.frame = frame
    cases = _cases(zlib.crc32(f"{frame}/{variant}".encode()), 512, frame)
    seen = _run(config, cases, config.schedule)
    assert seen["tie"] > 4, seen
    print(seen)


def test_greedy_matcher_matches_reference():
    config = rewards.default_config("official", schedule="official_adaptive")
    config.matcher = "greedy"
    seen = _run(config, _cases(17, 512), config.schedule)
    print(seen)


@pytest.mark.parametrize("variant", ["official", "easyr1"])
def test_max_boxes_cap_matches_reference(variant):
    config = rewards.default_config(variant)
    config.max_boxes = 8  # below most answers' box count: the cap and the divisor M matter
    cases = _cases(zlib.crc32(f"cap/{variant}".encode()), 512)
    seen = _run(config, cases, config.schedule)
    print(seen)


def test_recall_tie_counts_xi0():
    """SPEC §3 / issue example: GIoU exactly ξ0 adds ξ0 to TP (modify_tensor(q, ξ0, ξ0))."""
    target = rewards.Target([[0, 0, 10, 20]], ["cat"], (100, 100), (100, 100))
    answer = '[{"bbox_2d": [0, 0, 10, 10], "label": "cat"}]'
    out = rewards.score([answer], [target])
    want = ref.reward(answer, target, stage=ref.thresholds("off", 0))
    assert (want["recall"], want["total"]) == (0.5, 2.0)
    assert (float(out["recall"][0]), float(out["total"][0])) == (0.5, 2.0)
    # The adaptive schedule's advanced stage: ξ0 = 0.75, a tie adds 0.75; recall map (0.5, 0.75)
    # leaves 0.75; precision map (0.75, 0.9) leaves 0.75.
    config = rewards.default_config("official", schedule="official_adaptive")
    answer = '[{"bbox_2d": [0, 0, 10, 15], "label": "cat"}]'
    out = rewards.score([answer], [target], step=1500, config=config)
    want = ref.reward(answer, target, stage=ref.thresholds("official_adaptive", 1500))
    assert float(out["recall"][0]) == want["recall"] == 0.75
    assert float(out["precision"][0]) == want["precision"] == 0.75


def test_string_coordinates_are_scored():
    """Issue example: digit strings are read by int(), as the reference's [int(c) ...]."""
    target = rewards.Target([[95, 870, 202, 1019]], ["potted plant"], (1024, 768), (1024, 768))
    answer = '[{"bbox_2d": ["95", " 870 ", "+202", "1_019"], "label": "potted plant"}]'
    out = rewards.score([answer], [target])
    want = ref.reward(answer, target)
    assert (want["recall"], want["precision"], want["total"]) == (1.0, 1.0, 3.0)
    assert float(out["total"][0]) == 3.0
    # The strict (paper) format wants JSON numbers: the box still scores, the format fails.
    paper = rewards.default_config("paper")
    out = rewards.score([answer], [target], config=paper)
    assert float(out["format"][0]) == 0.0 and float(out["recall"][0]) == 1.0


def test_cases_cover_every_situation():
    """The generator really produces the situations the module docstring lists."""
    cases = _cases(0, 2048)
    texts = [c for c, _ in cases]
    n_gt = np.array([len(t.boxes) for _, t in cases])
    results = [ref.reward(c, t, stage=ref.thresholds("off", 0)) for c, t in cases]
    n_pred = np.array([len(r["labels"]) for r in results])
    assert (n_gt == 0).sum() > 50 and n_gt.max() == 30
    assert n_pred.max() >= 30 and (n_pred == 0).sum() > 100
    assert sum(ref.dual_format(c) == 0 for c in texts) > 100  # invalid / truncated JSON
    regex = sum(1 for c, r in zip(texts, results, strict=True) if r["labels"] and not
                isinstance(ref.parse_json(c), list))  # fmt: skip
    assert regex > 20
    unknown = sum(r["labels"].count(0) for r in results)
    assert unknown > 100
    kept = {"str": 0, "bool": 0, "float": 0, "rejected": 0}
    for text in texts:
        data = ref.parse_json(text)
        for item in data if isinstance(data, list) else []:
            box = item.get("bbox_2d") if isinstance(item, dict) else None
            if not (isinstance(box, list) and len(box) == 4):
                continue
            if ref.extract(json.dumps([item])):
                for kind in ("str", "bool", "float"):
                    kept[kind] += any(type(c).__name__ == kind for c in box)
            else:
                kept["rejected"] += 1
    assert min(kept.values()) > 30, kept
    qs = np.concatenate([r["q"] for r in results if len(r["q"])])
    assert (qs == 0.5).sum() > 30 and (qs == 0.75).sum() > 10, "exact ties at the thresholds"
