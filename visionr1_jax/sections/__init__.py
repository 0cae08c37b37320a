"""The config sections of a run, and their validators: jax-free, so that a config file (and any
host or tool that reads one) loads in milliseconds without importing jax or the trainer.

A run config (`configs/*.py`, big_vision style) builds its sections from these functions and
overrides fields; `config_lib.validate` checks every section present before anything compiles.

    reward      `reward_config(variant, ...)` (`sections.reward`; `rewards.default_config`)
    model/mesh  `model_config()`, `mesh_config(ici, dcn)` (`sections.model`)
    data        `visionr1_jax.data.data_config()` (the data's own section, jax-free as well)
    grpo/optim  `grpo_config()`, `optim_config()` (`sections.training`)
    sft         `sft_config()` (`sections.training`)
    eval        `eval_config()` (`sections.run`)
    checkpoint  `checkpoint_config()` (`sections.run`)
    metrics     `metrics_config()` (`sections.run`)
    experiment  `experiment_config()` (`sections.run`)
"""

from visionr1_jax.sections.model import mesh_config, model_config
from visionr1_jax.sections.reward import default_config as reward_config
from visionr1_jax.sections.run import (
    checkpoint_config,
    eval_config,
    experiment_config,
    metrics_config,
)
from visionr1_jax.sections.training import grpo_config, optim_config, sft_config

__all__ = [
    "checkpoint_config",
    "eval_config",
    "experiment_config",
    "grpo_config",
    "mesh_config",
    "metrics_config",
    "model_config",
    "optim_config",
    "reward_config",
    "sft_config",
]
