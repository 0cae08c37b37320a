"""Loading, arguments and validation of run configs (big_vision style).

Every run config is a file in ``configs/`` with ``get_config(arg=None) -> ConfigDict``, built
from the jax-free sections of ``visionr1_jax.sections`` (and ``visionr1_jax.data``);
variants come through ``--config=configs/x.py:variant`` (or ``key=value,key2=value``) and
single values through ``--config.a.b=value``. ``validate`` runs before anything compiles and
rejects a bad value with a one-line message naming the key and the allowed range. Nothing here
imports jax: any host or tool reads and checks a config in milliseconds.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from visionr1_jax.data.config import frame_of, validate_data_config
from visionr1_jax.sections import model, reward, run, training
from visionr1_jax.sections.common import fail, is_int


def parse_arg(arg: str | None, **defaults):
    """Parses ``"variant"`` or ``"k=v,k2=v2"`` into a ConfigDict over ``defaults``.

    A bare word sets the first default key; values are cast to the default's type.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    first = next(iter(defaults), None)
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = first, key
        if key not in defaults:
            raise ValueError(f"config arg {key!r} is not one of {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.lower() in ("1", "true", "yes")
        elif defaults[key] is None:
            out[key] = value
        else:
            out[key] = kind(value)
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` like ``config_flags.DEFINE_config_file`` does."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _check_frames(config: ml_collections.ConfigDict) -> None:
    """The prompts ask for one coordinate frame and the reward parses answers in one: the two
    must be the same, or every box is rescaled wrongly without an error."""
    data_frame, reward_frame = frame_of(config.data), config.reward.frame
    if data_frame != reward_frame:
        implied = (
            "" if config.data.frame else f", implied by data.template={config.data.template!r}"
        )
        raise ValueError(
            f"data.frame={data_frame!r}{implied} and reward.frame={reward_frame!r} differ: "
            "the reward must read answers in the frame the prompts ask for; set both"
        )


# Each section's validator, in the order they run (a section absent from the config is not
# checked; cross-section rules live with the section that reads the other's value).
_SECTIONS = (
    ("reward", lambda c: reward.validate_config(c.reward, "reward")),
    ("data", lambda c: validate_data_config(c.data)),
    ("model", model.validate_model),
    ("mesh", model.validate_mesh),
    ("grpo", training.validate_grpo),
    ("optim", training.validate_optim),
    ("sft", training.validate_sft),
    ("checkpoint", run.validate_checkpoint),
    ("metrics", run.validate_metrics),
    ("eval", run.validate_eval),
    ("experiment", run.validate_experiment),
)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates every section present; returns the config for chaining."""
    for name, check in _SECTIONS:
        if name in config:
            check(config)
            if name == "data" and "reward" in config:
                _check_frames(config)
    training.validate_run_keys(config)
    for key in ("seed", "total_steps"):
        if key in config and (not is_int(config[key]) or config[key] < 0):
            fail(key, config[key], "must be an integer >= 0")
    return config
