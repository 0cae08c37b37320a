"""Step-indexed rule refinement: validation, stage values, and no recompilation on a switch."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from visionr1_jax import rewards
from visionr1_jax.rewards import schedule


def test_presets_match_spec():
    off = schedule.preset("off")
    assert off == [schedule.stage(0, 0.5, 0.0, 1.0, 0.0, 1.0)]
    adaptive = schedule.preset("official_adaptive", 1500)
    assert adaptive[1] == schedule.stage(1500, 0.75, 0.5, 0.75, 0.75, 0.9)
    paper = schedule.preset("paper", 700)
    assert paper[0] == schedule.stage(0, 0.5, 0.5, 0.75, 0.5, 0.75)
    assert paper[1] == schedule.stage(700, 0.75, 0.75, 0.9, 0.75, 0.9)


@pytest.mark.parametrize(
    "stages, message",
    [
        ([], "at least one stage"),
        ([schedule.stage(5, 0.5, 0, 1, 0, 1)], r"\[0\].start_step must be 0"),
        (
            [schedule.stage(0, 0.5, 0, 1, 0, 1), schedule.stage(0, 0.5, 0, 1, 0, 1)],
            "strictly increasing",
        ),
        (
            [schedule.stage(0, 0.5, 0, 1, 0, 1), schedule.stage(10, 0.5, 0, 1, 0, 1)][::-1],
            r"\[0\].start_step must be 0",
        ),
        ([{**schedule.stage(0, 0.5, 0, 1, 0, 1), "recall_lo": 1.5}], r"\[0\].recall_lo=1.5"),
        ([{**schedule.stage(0, 0.5, 0.8, 0.2, 0, 1)}], "recall_lo=0.8 must be <="),
        (
            [schedule.stage(0, 0.5, 0, 1, 0, 1), {"start_step": 9, "recall_tp": 0.5}],
            r"\[1\] has keys",
        ),
        ([{**schedule.stage(0, 0.5, 0, 1, 0, 1), "start_step": 0.5}], "integer"),
    ],
)
def test_validation_names_the_key(stages, message):
    with pytest.raises(ValueError, match=message):
        schedule.validate(stages)


def test_lookup_switches_exactly_at_start_step():
    stages = schedule.preset("paper", 1500)
    for step, want in [(0, 0.5), (1499, 0.5), (1500, 0.75), (10**6, 0.75)]:
        got = schedule.lookup(stages, jnp.int32(step))
        assert float(got["recall_tp"]) == want
        assert int(got["stage"]) == (step >= 1500)


def test_stage_change_at_configured_step_without_recompiling():
    config = rewards.default_config("paper", switch_step=1500)
    fn = rewards.make_reward_fn(config)
    target = rewards.Target([[0, 0, 100, 100]], ["cat"], (100, 100), (100, 100))
    # IoU 0.81. Beginner precision map (0.5, 0.75) sends it to 1; the advanced map
    # (0.75, 0.9) keeps 0.81: precision must change from 1.0 to 0.81 exactly at step 1500.
    answer = '[{"bbox_2d": [0, 0, 90, 90], "label": "cat"}]'
    pred, gt, _ = rewards.prepare([answer], [target], config)
    before = fn._cache_size()
    values = {}
    for step in (0, 1499, 1500, 1501, 4000):
        _, aux = fn(pred, gt, jnp.int32(step))
        values[step] = float(aux["precision"][0])
    assert fn._cache_size() - before <= 1  # one compilation for all steps, none at the switch
    np.testing.assert_allclose([values[0], values[1499]], [1.0, 1.0])
    np.testing.assert_allclose([values[1500], values[1501], values[4000]], [0.81] * 3, rtol=1e-5)
    assert int(aux["threshold/stage"]) == 1


def test_reward_config_validation_names_the_key():
    config = rewards.default_config()
    config.overlap = "diou"
    with pytest.raises(ValueError, match=r"reward.overlap='diou' must be one of"):
        rewards.validate_config(config)
    config = rewards.default_config()
    config.max_boxes = 0
    with pytest.raises(ValueError, match=r"reward.max_boxes=0"):
        rewards.validate_config(config)
    config = rewards.default_config()
    config.stages = [schedule.stage(3, 0.5, 0, 1, 0, 1)]
    with pytest.raises(ValueError, match=r"reward.stages\[0\].start_step must be 0"):
        rewards.make_reward_fn(config)
    with pytest.raises(ValueError, match="variant"):
        rewards.default_config("dpo")


@pytest.mark.parametrize("variant", sorted(rewards.VARIANTS))
def test_variants_differ_as_the_spec_table_says(variant):
    config = rewards.default_config(variant)
    want = {
        "official": ("giou", "matched", "sum"),
        "paper": ("iou", "predictions", "sum"),
        "easyr1": ("giou", "predictions", "mean"),
    }[variant]
    assert (config.overlap, config.precision_divisor, config.combine) == want
    target = rewards.Target([[0, 0, 100, 100]], ["cat"], (100, 100), (100, 100))
    # One good box and one spurious: only the divisor M penalises the extra box.
    answer = (
        '[{"bbox_2d": [0, 0, 100, 100], "label": "cat"}, {"bbox_2d": [0, 0, 5, 5], "label": "cat"}]'
    )
    out = rewards.score([answer], [target], config=config)
    expected_precision = 1.0 if want[1] == "matched" else 0.5
    assert out["precision"][0] == pytest.approx(expected_precision)


def test_visual_rft_family():
    config = rewards.default_config()
    config.family = "visual_rft"
    target = rewards.Target(
        [[0, 0, 100, 100], [200, 200, 300, 300]], ["a", "b"], (400, 400), (400, 400)
    )
    answer = json.dumps(
        [
            {"bbox_2d": [0, 0, 100, 80], "label": "a"},
            {"bbox_2d": [0, 0, 100, 100], "label": "a"},
            {"bbox_2d": [0, 300, 10, 310], "label": "b"},
        ]
    )
    out = rewards.score([answer], [target], config=config)
    # Greedy in answer order: the first box takes GT 0 (IoU 0.8), the second finds GT 0 taken
    # and GT 1 at IoU 0, the third overlaps nothing. ΣIoU / max(2, 3) = 0.8 / 3.
    assert out["iou_accuracy"][0] == pytest.approx(0.8 / 3, rel=1e-5)
    assert out["total"][0] == pytest.approx(1.0 + 0.8 / 3, rel=1e-5)
