"""Parsing and scoring never raise, stay finite and bounded, whatever the model writes."""

import json

import numpy as np
import pytest
import reward_reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visionr1_jax import rewards
from visionr1_jax.rewards import parse

TARGET = rewards.Target(
    [[10, 20, 110, 220], [200, 40, 300, 90]], ["cat", "dog"], (480, 640), (476, 644)
)
NEGATIVE = rewards.Target(np.zeros((0, 4)), [], (480, 640), (476, 644), {"cat": 1})
VALID = '```json\n[{"bbox_2d": [10, 20, 111, 219], "label": "cat"}, {"bbox_2d": [201, 41, 300, 90], "label": "dog"}]\n```'  # noqa: E501


def _check(texts, targets=None, variants=("official", "paper", "easyr1")):
    targets = targets or [TARGET if k % 3 else NEGATIVE for k in range(len(texts))]
    for variant in variants:
        config = rewards.default_config(variant)
        config.max_boxes = 32
        for step in (0, 5000):
            out = rewards.score(texts, targets, step=step, config=config)
            hi = 1.0 if config.combine == "mean" else 3.0
            for key in ("format", "recall", "precision", "total"):
                assert out[key].shape == (len(texts),)
                assert np.all(np.isfinite(out[key])), key
            # The sum of three float32 terms ≤ 1 rounds at most 2 ulps of 3 (< 1e-6) past hi.
            assert np.all((out["total"] >= 0) & (out["total"] <= hi + 1e-6))
            assert np.all(out["num_pred"] <= config.max_boxes)
    config = rewards.default_config()
    config.family = "visual_rft"
    out = rewards.score(texts, targets, config=config)
    assert np.all(np.isfinite(out["total"])) and np.all((out["total"] >= 0) & (out["total"] <= 2))


ADVERSARIAL = [
    "",
    " ",
    "[]",
    "```json\n[]\n```",
    "{}",
    "null",
    "42",
    '"just a string"',
    "[" * 10_000 + "]" * 10_000,
    "[" * 10_000,
    '{"a":' * 10_000 + "1" + "}" * 10_000,
    "x" * 1_000_000,
    '[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}' + ", 1" * 300_000 + "]",
    '[{"bbox_2d": [NaN, 2, 30, 40], "label": "cat"}]',
    '[{"bbox_2d": [Infinity, 2, -Infinity, 40], "label": "cat"}]',
    '[{"bbox_2d": [1e309, 2, 30, 40], "label": "cat"}]',
    '[{"bbox_2d": [1e300, 2, 1e301, 40], "label": "cat"}]',
    '[{"bbox_2d": [' + "9" * 5000 + ', 2, 30, 40], "label": "cat"}]',
    '[{"bbox_2d": [-50, -20, -10, -5], "label": "cat"}]',
    '[{"bbox_2d": [10.7, 20.2, 110.9, 219.5], "label": "cat"}]',
    '[{"bbox_2d": [10, 20, 110, 220], "label": "chat 🐱 猫"}]',
    '[{"bbox_2d": [10, 20, 110, 220], "label": "\\ud800"}]',
    '[{"bbox_2d": [10, 20, 110, 220], "label": null}]',
    '[{"bbox_2d": [10, 20, 110, 220], "label": ["cat"]}]',
    '[{"bbox_2d": {"x": 1}, "label": "cat"}]',
    '[{"bbox_2d": [true, false, 1, 2], "label": "cat"}]',
    '[{"bbox_2d": ["1", " 2 ", "+30", "4_0"], "label": "cat"}]',
    '[{"bbox_2d": ["' + "9" * 5000 + '", 2, 30, 40], "label": "cat"}]',
    '[{"bbox_2d": ["' + "9" * 4000 + '", 2, "' + "9" * 4001 + '", 40], "label": "cat"}]',
    '[{"bbox_2d": [-1e300, 2, 1e300, 40], "label": "cat"}]',
    '[{"bbox_2d": [-' + "9" * 400 + ", 2, " + "9" * 400 + ', 40], "label": "cat"}]',
    '[{"bbox_2d": ["nan", "inf", "-inf", "1e3"], "label": "cat"}]',
    '[{"bbox_2d": ["' + " " * 100_000 + '1", 2, 30, 40], "label": "cat"}]',
    '{"bbox_2d": [10, 20, 110, 220], "label": "cat"}',
    "```json\n```json\n[]\n```\n```",
    "```\n[]",
    '[{"bbox_2d": [10, 20, 110, 220], "label": "cat"}] trailing',
    json.dumps([{"bbox_2d": [k, k, k + 10, k + 10], "label": "cat"} for k in range(500)]),
    "\x00\x01\x02",
    "\ufeff[]",
]


def test_adversarial_corpus():
    _check(ADVERSARIAL)
    # Too many boxes are capped and counted.
    out = rewards.score([ADVERSARIAL[-3]], [TARGET], config=rewards.default_config())
    assert out["num_dropped"][0] == 500 - 64 and out["num_pred"][0] == 64


def test_empty_batch_has_every_key():
    out = rewards.score([], [])
    for key in ("format", "recall", "precision", "total", "num_dropped"):
        assert out[key].shape == (0,)


def test_truncation_at_every_position():
    texts = [VALID[:k] for k in range(len(VALID) + 1)]
    _check(texts, [TARGET] * len(texts), variants=("official",))
    # Truncated answers still recover the complete items through the regex fallback.
    out = rewards.score([VALID[: VALID.index("}, {") + 1]], [TARGET])
    assert out["num_pred"][0] == 1 and out["format"][0] == 0.0


# Coordinates as JSON may write them; the expected value is Python's own int() (the
# reference's [int(c) for c in box]), or a dropped item where int() raises.
COORDINATES = [
    5, True, False, 5.9, -0.5, -1.7, 1e-300, "5", " 5 ", "+5", "-0", "5\n", "\t5", "0_5", "٣",
    "１０", "5.0", "5.", "", " ", "five", "0x5", "1e1", "5_", "_5", "5__0", "−5", None, [5],
    {"x": 5}, float("nan"), float("inf"), float("-inf"),
]  # fmt: skip


def _python_int(c):
    try:
        return int(c)
    except (ValueError, TypeError, OverflowError):
        return None


@pytest.mark.parametrize("c", COORDINATES, ids=repr)
def test_coordinates_cast_like_python_int(c):
    box = [c, 0, 100, 100]
    text = json.dumps([{"bbox_2d": box, "label": "cat"}])
    got = parse.parse_answer(text, input_size=(476, 644)).boxes
    want = _python_int(c)
    if want is None or not want < 100:
        assert got == [], (c, got)
    else:
        assert got == [[float(want), 0.0, 100.0, 100.0]], (c, got)
    # norm01 reads with float() instead; same acceptance of types, finite values only.
    text = json.dumps([{"bbox_2d": [c, 0, 1, 1], "label": "cat"}])
    got = parse.parse_answer(text, frame="norm01").boxes
    try:
        want = float(c)
    except (ValueError, TypeError):
        want = None
    if want is None or not np.isfinite(want) or not want < 1:
        assert got == [], (c, got)
    else:
        assert got == [[want, 0.0, 1.0, 1.0]], (c, got)


def test_huge_integers_never_overflow():
    """int() accepts them (the reference would then fail to build a float32 tensor); beyond
    ``max_coord`` the item is dropped before any float conversion, the rest is kept."""
    good = {"bbox_2d": [10, 20, 110, 220], "label": "cat"}
    for huge in (10**400, "9" * 4000, 1e300, -(10**40)):
        items = [{"bbox_2d": [1, 2, huge, 40], "label": "cat"}, good]
        text = json.dumps(items)
        parsed = parse.parse_answer(text, input_size=(476, 644))
        assert parsed.boxes == [[10.0, 20.0, 110.0, 220.0]], huge
        out = rewards.score([text], [TARGET])
        assert np.isfinite(out["total"][0]) and out["num_pred"][0] == 1


def test_parse_answer_bounds_and_frames():
    many = json.dumps([{"bbox_2d": [1, 1, 5, 5], "label": "a"}] * 100)
    parsed = parse.parse_answer(many, max_boxes=7)
    assert len(parsed.boxes) == 7 and parsed.num_dropped == 93
    rel = parse.parse_answer('[{"bbox_2d": [100, 200, 500, 1000], "label": "a"}]', frame="rel1000")
    px = parse.to_original_pixels(np.array(rel.boxes), "rel1000", (480, 640), (1, 1))
    np.testing.assert_array_equal(px, [[64, 96, 320, 480]])  # integer results: exact
    norm = parse.parse_answer('[{"bbox_2d": [0.1, 0.25, 0.5, 1.0], "label": "a"}]', frame="norm01")
    px = parse.to_original_pixels(np.array(norm.boxes), "norm01", (480, 640), (1, 1))
    # x·W rounded once to float32 (0.1·640 is not exact in binary): ≤ 1 ulp = 2^-23 relative.
    np.testing.assert_allclose(px, [[64, 120, 320, 480]], rtol=2.0**-23)
    # Integer frames truncate like the reference's int(); norm01 keeps decimals.
    assert parse.parse_answer('[{"bbox_2d": [0.1, 0.2, 0.9, 1.0], "label": "a"}]').boxes == []
    truncated = '[{"bbox_2d": [0.1, 0.2, 0.9, 0.95], "label": "a"}, {"bbox'
    assert parse.parse_answer(truncated, frame="norm01").boxes == [[0.1, 0.2, 0.9, 0.95]]
    with pytest.raises(ValueError, match="frame"):
        parse.parse_answer("[]", frame="pixels")


FORMAT_CASES = [
    '[{"bbox_2d": null, "label": "cat"}]',
    '[{"bbox_2d": [1, 2, 3], "label": "cat"}]',
    '[{"bbox_2d": [1, 2, 30, 40]}, {"label": "cat"}]',
    '[{"bbox_2d": "1,2,3,4", "label": "cat"}]',
    '[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}, 7, "x"]',
    '[{"bbox_2d": [NaN, 2, 30, 40], "label": "cat"}]',
    '[{"bbox_2d": [1, 2, 700, 40], "label": "cat"}]',
    '[{"bbox_2d": [30, 2, 1, 40], "label": "cat"}]',
    '{"bbox_2d": [1, 2, 3], "label": "cat"}',
    "```json\n[]\n```",
    "null",
    "[1, 2",
]


@pytest.mark.parametrize("text", FORMAT_CASES)
def test_format_flags_match_reference(text):
    got = parse.parse_answer(text, input_size=(476, 644))
    assert got.format_official == ref.dual_format(text)
    assert got.format_strict == ref.strict_format(text, "qwen25_abs", (476, 644))


def test_strict_format_checks_content():
    inside = '[{"bbox_2d": [0, 0, 644, 476], "label": "cat"}]'
    outside = '[{"bbox_2d": [0, 0, 645, 476], "label": "cat"}]'
    unordered = '[{"bbox_2d": [50, 0, 10, 476], "label": "cat"}]'
    missing = '[{"bbox_2d": [0, 0, 10, 10]}]'
    got = [parse.parse_answer(t, input_size=(476, 644)) for t in (inside, outside, unordered)]
    assert [g.format_strict for g in got] == [1.0, 0.0, 0.0]
    assert [g.format_official for g in got] == [1.0, 1.0, 1.0]
    assert parse.parse_answer(missing, input_size=(476, 644)).format_strict == 0.0


def test_target_validation():
    with pytest.raises(ValueError, match="labels"):
        rewards.Target([[0, 0, 1, 1]], [], (10, 10), (28, 28))
    with pytest.raises(ValueError, match="finite"):
        rewards.Target([[0, 0, np.nan, 1]], ["a"], (10, 10), (28, 28))
    with pytest.raises(ValueError, match="image_size"):
        rewards.Target([[0, 0, 1, 1]], ["a"], (0, 10), (28, 28))
    with pytest.raises(ValueError, match="label_to_id"):
        rewards.Target([[0, 0, 1, 1]], ["a"], (10, 10), (28, 28), {"b": 1})
    t = rewards.Target([[0, 0, 1, 1]] * 3, ["Dog", "cat", "dog"], (10, 10), (28, 28))
    assert t.label_to_id == {"dog": 1, "cat": 2} and list(t.label_ids) == [1, 2, 1]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.from_regex(r"\A\s*[+-]?[0-9_٣]{1,30}\s*\Z")  # strings int() may accept
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
items = st.fixed_dictionaries(
    {"bbox_2d": st.one_of(st.lists(json_values, max_size=5), json_values),
     "label": st.one_of(st.sampled_from(["cat", "dog", " CAT ", "bird"]), json_values)}
)  # fmt: skip


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.text(max_size=200),
            st.builds(lambda xs: json.dumps(xs), st.lists(items, max_size=8)),
            st.builds(
                lambda xs, k: json.dumps(xs)[:k], st.lists(items, max_size=8), st.integers(0, 400)
            ),
            st.builds(lambda v: "```json\n" + json.dumps(v) + "\n```", json_values),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_never_raises(texts):
    _check(texts, variants=("official",))
