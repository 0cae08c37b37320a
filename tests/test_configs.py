"""Every file in configs/ loads and validates; bad values are rejected naming the key."""

import pathlib

import pytest

from visionr1_jax import config_lib, sections

CONFIGS = sorted(str(p) for p in pathlib.Path(__file__).parent.parent.glob("configs/*.py"))
# The configs that take the reward args (variant, schedule, switch_step): all but the SFT and
# evaluation ones, which have no reward section.
NO_REWARD = ("eval_coco.py", "eval_odinw.py", "sft_vision_r1_data.py")
REWARD_CONFIGS = [p for p in CONFIGS if not p.endswith(NO_REWARD)]


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_loads_and_validates(path):
    config = config_lib.validate(config_lib.load_config(path))
    assert ("reward" in config) == (path in REWARD_CONFIGS)


def test_variant_args_reach_the_reward():
    config = config_lib.load_config("configs/rewards_demo.py:variant=paper,step=2000")
    assert config.reward.variant == "paper" and config.step == 2000
    config = config_lib.load_config("configs/demo_cpu.py:easyr1")
    assert config.reward.combine == "mean"
    config = config_lib.load_config("configs/demo_cpu.py:variant=paper,switch_step=40")
    assert config.reward.stages[1]["start_step"] == 40
    with pytest.raises(ValueError, match="not one of"):
        config_lib.load_config("configs/demo_cpu.py:nonsense_key=1")


@pytest.mark.parametrize("path", REWARD_CONFIGS)
def test_schedule_arg_selects_the_released_adaptive_switch(path):
    """SPEC §4: the released ``--adaptive`` schedule by name, its STEP movable."""
    config = config_lib.validate(config_lib.load_config(f"{path}:schedule=official_adaptive"))
    assert (config.reward.variant, config.reward.schedule) == ("official", "official_adaptive")
    assert [s["start_step"] for s in config.reward.stages] == [0, 1500]
    assert config.reward.stages[1]["recall_tp"] == 0.75
    spec = f"{path}:schedule=official_adaptive,switch_step=200"
    assert config_lib.validate(config_lib.load_config(spec)).reward.stages[1]["start_step"] == 200


@pytest.mark.parametrize(
    "arg",
    [
        "switch_step=200",
        "variant=easyr1,switch_step=200",
        "variant=paper,schedule=off,switch_step=9",
    ],
)
def test_switch_step_without_a_switch_is_rejected(arg):
    with pytest.raises(ValueError, match=r"reward.switch_step=\d+ has no effect"):
        config_lib.load_config(f"configs/demo_cpu.py:{arg}")


def test_switch_step_override_without_its_stages_is_rejected():
    config = config_lib.load_config("configs/demo_cpu.py:variant=paper")
    config.reward.switch_step = 40  # like --config.reward.switch_step=40: stages keep 1500
    with pytest.raises(ValueError, match=r"reward.stages do not follow reward.schedule='paper'"):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "data_frame, template, reward_frame, ok",
    [
        (None, "qwen25", "qwen25_abs", True),
        (None, "griffon", "norm01", True),
        ("rel1000", "qwen25", "rel1000", True),
        (None, "griffon", "qwen25_abs", False),
        ("rel1000", "qwen25", "qwen25_abs", False),
        (None, "qwen25", "norm01", False),
    ],
)
def test_data_and_reward_frames_must_agree(data_frame, template, reward_frame, ok):
    config = config_lib.load_config("configs/demo_cpu.py")
    config.data.frame, config.data.template, config.reward.frame = (
        data_frame,
        template,
        reward_frame,
    )
    if ok:
        config_lib.validate(config)
        return
    shown = data_frame or {"qwen25": "qwen25_abs", "griffon": "norm01"}[template]
    with pytest.raises(ValueError, match=rf"data.frame='{shown}'.*reward.frame='{reward_frame}'"):
        config_lib.validate(config)


def _untyped(section, key, value):
    """A mutation setting `key` to a value of another type (a config written by hand, not
    from the section's defaults, which ml_collections would type-check first)."""

    def mutate(c):
        del c[section][key]
        c[section][key] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: setattr(c.reward, "combine", "max"), r"reward.combine='max'"),
        (lambda c: setattr(c.data, "batch_size", 0), r"data.batch_size"),
        (lambda c: setattr(c.model, "dtype", "int8"), r"model.dtype='int8'"),
        (lambda c: setattr(c.mesh, "ici_parallelism", (-1, -1, 1)), r"mesh.ici_parallelism"),
        (lambda c: setattr(c, "total_steps", -3), r"total_steps=-3"),
        (lambda c: setattr(c.model, "logprob_chunk", 0), r"model.logprob_chunk=0"),
        (_untyped("model", "scan_layers", "yes"), r"model.scan_layers='yes' must be True or False"),
    ],
)
def test_validation_rejects_bad_values(mutate, message):
    config = config_lib.load_config("configs/demo_cpu.py")
    mutate(config)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_parse_arg_casts_to_default_types():
    args = config_lib.parse_arg(
        "variant=paper,step=7,flag=true", variant="official", step=0, flag=False
    )
    assert (args.variant, args.step, args.flag) == ("paper", 7, True)
    assert config_lib.parse_arg("paper", variant="official").variant == "paper"


def test_grpo_and_optim_sections_are_validated_with_the_run_config():
    config = config_lib.load_config("configs/demo_cpu.py")
    config.grpo, config.optim = sections.grpo_config(), sections.optim_config()
    assert config.model.freeze_vision_tower is False
    config_lib.validate(config)
    config.grpo.epsilon_high = 0.28  # no effect with one update per rollout
    with pytest.raises(ValueError, match=r"grpo\.epsilon_high"):
        config_lib.validate(config)
