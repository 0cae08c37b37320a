"""The jax-free config sections (`visionr1_jax.sections`) against what reads them.

A section lists the names a config may choose (estimators, KL estimators, aggregations, reward
families, matchers, frames, LoRA targets) without importing the kernels that implement them;
these tests hold each list to the kernels' own registry, so a new kernel entry cannot be
unreachable from a config and a config cannot name a missing one. Each validator's messages
name the key; a removed key names the one that replaced it.
"""

from __future__ import annotations

import ml_collections
import pytest

from visionr1_jax import config_lib, grpo, rewards, sections
from visionr1_jax.data import data_config, templates
from visionr1_jax.models import qwen_vl
from visionr1_jax.rewards import matching, parse
from visionr1_jax.sections import model, reward, training


def test_section_choices_are_the_kernels_registries():
    assert training.ESTIMATORS == tuple(grpo.ESTIMATORS)
    assert training.KL_ESTIMATORS == tuple(grpo.KL_ESTIMATORS)
    assert training.AGGREGATIONS == tuple(grpo.AGGREGATIONS)
    assert training.IMPORTANCE_LEVELS == tuple(grpo.IMPORTANCE_LEVELS)
    assert reward.FAMILIES == tuple(rewards.REWARD_FAMILIES)
    assert reward.MATCHERS == tuple(matching.MATCHERS)
    assert parse.FRAMES is reward.FRAMES and templates.FRAMES is reward.FRAMES
    assert model.LORA_TARGETS == qwen_vl.LORA_TARGETS


def _run_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.objective = "sft"
    c.total_steps = 10
    c.model = sections.model_config()
    c.data = data_config()
    c.grpo = sections.grpo_config()
    c.optim = sections.optim_config()
    c.sft = sections.sft_config()
    c.eval = sections.eval_config()
    c.checkpoint = sections.checkpoint_config()
    c.metrics = sections.metrics_config()
    c.mesh = sections.mesh_config()
    return c


def test_a_full_config_of_every_section_validates():
    config_lib.validate(_run_config())


@pytest.mark.parametrize(
    "old, new", [("eval_every", "eval.every"), ("eval_batches", "eval.batches"),
                 ("eval_max_new_tokens", "eval.max_new_tokens")],
)  # fmt: skip
def test_the_old_sft_evaluation_keys_name_their_replacement(old, new):
    c = _run_config()
    c.sft[old] = 5
    with pytest.raises(ValueError, match=rf"sft\.{old}=5 was replaced by {new}"):
        config_lib.validate(c)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("grpo", "kl", "k9", r"grpo\.kl='k9' must be one of"),
        ("optim", "mu_dtype", "float16", r"optim\.mu_dtype='float16' must be None"),
        ("model", "remat_policy", "most", r"model\.remat_policy='most' must be one of"),
        ("eval", "score", "rank", r"eval\.score='rank' must be one of"),
        ("checkpoint", "keep", 0, r"checkpoint\.keep=0 must be a positive integer"),
        ("metrics", "render_count", 0, r"metrics\.render_count=0 must be an integer"),
        ("eval", "evry", 3, r"eval\.evry=3 is not a key of the eval section"),
    ],
)
def test_a_bad_value_names_its_key(section, key, value, message):
    c = _run_config()
    c[section][key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)
