"""Step-indexed rule refinement: validation, stage values, and no recompilation on a switch."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from visionr1_jax import rewards
from visionr1_jax.rewards import schedule
from visionr1_jax.sections import reward as reward_section


def test_presets_match_spec():
    off = reward_section.preset("off")
    assert off == [reward_section.stage(0, 0.5, 0.0, 1.0, 0.0, 1.0)]
    adaptive = reward_section.preset("official_adaptive", 1500)
    assert adaptive[1] == reward_section.stage(1500, 0.75, 0.5, 0.75, 0.75, 0.9)
    paper = reward_section.preset("paper", 700)
    assert paper[0] == reward_section.stage(0, 0.5, 0.5, 0.75, 0.5, 0.75)
    assert paper[1] == reward_section.stage(700, 0.75, 0.75, 0.9, 0.75, 0.9)


@pytest.mark.parametrize(
    "stages, message",
    [
        ([], "at least one stage"),
        ([reward_section.stage(5, 0.5, 0, 1, 0, 1)], r"\[0\].start_step must be 0"),
        (
            [reward_section.stage(0, 0.5, 0, 1, 0, 1), reward_section.stage(0, 0.5, 0, 1, 0, 1)],
            "strictly increasing",
        ),
        (
            [
                reward_section.stage(0, 0.5, 0, 1, 0, 1),
                reward_section.stage(10, 0.5, 0, 1, 0, 1),
            ][::-1],
            r"\[0\].start_step must be 0",
        ),
        ([{**reward_section.stage(0, 0.5, 0, 1, 0, 1), "recall_lo": 1.5}], r"\[0\].recall_lo=1.5"),
        ([{**reward_section.stage(0, 0.5, 0.8, 0.2, 0, 1)}], "recall_lo=0.8 must be <="),
        (
            [reward_section.stage(0, 0.5, 0, 1, 0, 1), {"start_step": 9, "recall_tp": 0.5}],
            r"\[1\] has keys",
        ),
        ([{**reward_section.stage(0, 0.5, 0, 1, 0, 1), "start_step": 0.5}], "integer"),
    ],
)
def test_validation_names_the_key(stages, message):
    with pytest.raises(ValueError, match=message):
        reward_section.validate_stages(stages)


def test_lookup_switches_exactly_at_start_step():
    stages = reward_section.preset("paper", 1500)
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
    # IoU 8100/10000: one correctly rounded float32 division, ≤ 1 ulp (2^-24 relative) off.
    np.testing.assert_allclose([values[1500], values[1501], values[4000]], [0.81] * 3, rtol=2**-23)
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
    config.schedule = "custom"
    config.stages = [reward_section.stage(3, 0.5, 0, 1, 0, 1)]
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
    assert out["precision"][0] == expected_precision  # 1/1 or (1 + 0)/2: exact in float32


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
    # 0.8 = 8000/10000 and the division by 3 round once each in float32 (≤ 2 ulps); the total
    # adds one more rounding: 2^-22 relative.
    assert out["iou_accuracy"][0] == pytest.approx(0.8 / 3, rel=2**-22)
    assert out["total"][0] == pytest.approx(1.0 + 0.8 / 3, rel=2**-22)


@pytest.mark.parametrize(
    "variant, schedule_name, switch_step, want",
    [
        ("official", None, None, reward_section.preset("off")),
        ("official", "official_adaptive", None, reward_section.preset("official_adaptive", 1500)),
        ("official", "official_adaptive", 40, reward_section.preset("official_adaptive", 40)),
        ("easyr1", "official_adaptive", "700", reward_section.preset("official_adaptive", 700)),
        ("paper", None, None, reward_section.preset("paper", 1500)),
        ("paper", "off", None, reward_section.preset("off")),
    ],
)
def test_schedule_is_selected_by_name(variant, schedule_name, switch_step, want):
    config = rewards.default_config(variant, schedule=schedule_name, switch_step=switch_step)
    rewards.validate_config(config)
    assert config.stages == want
    assert config.schedule == (schedule_name or ("paper" if variant == "paper" else "off"))


def test_official_adaptive_switches_in_the_reward():
    """The released --adaptive code by name: GIoU 0.81 is 1 in the beginner precision map
    (0.5, 0.75) and stays 0.81 in the advanced one (0.75, 0.9) from switch_step on."""
    config = rewards.default_config("official", schedule="official_adaptive", switch_step=10)
    target = rewards.Target([[0, 0, 100, 100]], ["cat"], (100, 100), (100, 100))
    answer = '[{"bbox_2d": [0, 0, 90, 90], "label": "cat"}]'
    before = rewards.score([answer], [target], step=9, config=config)
    after = rewards.score([answer], [target], step=10, config=config)
    assert float(before["precision"][0]) == 1.0
    # GIoU = 8100/10000 in float32, the same value the advanced map leaves unchanged.
    assert float(after["precision"][0]) == float(np.float32(8100) / np.float32(10000))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="official", switch_step=200), r"reward.switch_step=200 has no effect"),
        (dict(variant="easyr1", switch_step=5), r"reward.switch_step=5 has no effect"),
        (dict(variant="paper", schedule="off", switch_step=5), r"schedule='off' has no switch"),
        (dict(variant="paper", schedule="linear"), r"reward.schedule='linear' must be one of"),
        (dict(variant="paper", switch_step="soon"), r"reward.switch_step='soon' must be an int"),
    ],
)
def test_default_config_rejects_values_without_effect(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rewards.default_config(**kwargs)


def _changed(variant, **values):
    config = rewards.default_config(variant)
    for key, value in values.items():
        config[key] = value
    return config


@pytest.mark.parametrize(
    "config, message",
    [
        # A switch step set alone on a config whose stages were derived without it.
        (_changed("official", switch_step=700), r"reward.switch_step=700 has no effect"),
        (_changed("paper", switch_step=700), r"reward.stages do not follow reward.schedule"),
        (_changed("official", schedule="paper"), r"reward.switch_step=None must be an integer"),
        (
            _changed("official", schedule="paper", switch_step=1500),
            r"reward.stages do not follow reward.schedule='paper'",
        ),
        (_changed("paper", switch_step=0), r"reward.switch_step=0 must be an integer >= 1"),
        (_changed("paper", schedule="custom"), r"reward.switch_step=1500 has no effect"),
        (_changed("official", schedule="adaptive"), r"reward.schedule='adaptive' must be one"),
    ],
)
def test_validation_rejects_schedule_values_without_effect(config, message):
    with pytest.raises(ValueError, match=message):
        rewards.validate_config(config)


def test_custom_stages():
    config = rewards.default_config("official")
    config.schedule = "custom"
    config.stages = [
        reward_section.stage(0, 0.5, 0, 1, 0, 1),
        reward_section.stage(7, 0.6, 0, 1, 0, 1),
    ]
    rewards.validate_config(config)
    out = rewards.score(["[]"], [rewards.Target([[0, 0, 1, 1]], ["a"], (9, 9), (9, 9))], step=7,
                        config=config)  # fmt: skip
    assert float(out["threshold/recall_tp"]) == np.float32(0.6)
