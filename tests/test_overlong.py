"""Overlong completions (issue 28, point 3): DAPO's soft overlong penalty (`reward.overlong`)
against hand-computed values, `grpo.mask_truncated` in the rollout's advantage program (no
loss for a truncated completion, still counted in its group), and their config checks."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from visionr1_jax import config_lib, rollout, sections, sharding


@pytest.mark.parametrize(
    ("max_len", "cache", "lengths", "want"),
    [
        # window of 4 before the budget of 10: 0 up to 6 tokens, then -1/4 per token to -1
        (10, 4, [1, 6, 7, 8, 9, 10], [0.0, 0.0, -0.25, -0.5, -0.75, -1.0]),
        (10, 10, [0, 5, 10], [0.0, -0.5, -1.0]),  # the whole budget is the window
        (10, 1, [9, 10], [0.0, -1.0]),
        (10, 0, [1, 10], [0.0, 0.0]),  # off
    ],
)
def test_overlong_penalty_is_dapos(max_len, cache, lengths, want):
    got = rollout.overlong_penalty(np.array(lengths, np.float32), max_len, cache)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(want, np.float32))


def test_mask_truncated_removes_the_loss_not_the_row_from_its_group():
    """Rows: (reward, valid, gets a loss). Group 0 = rows 0-1, row 1 truncated and masked;
    group 1 = rows 2-3, row 3 padding. Advantages by hand: grpo, unbiased std + 1e-4."""
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    rows = sharding.rows_sharding(mesh)
    program = rollout._advantages_program(2, "grpo", rows)
    scores = np.array([[1, 1, 1], [0, 1, 0], [2, 1, 1], [2, 0, 1]], np.float32)
    mask = np.ones((4, 3), bool)
    adv, scored = program(jax.device_put(scores, rows), jax.device_put(mask, rows))
    a = 0.5 / (np.sqrt(0.5) + 1e-4)  # group 0: mean 0.5, std sqrt(0.5)
    # float32: the centred values are exact, std and the division two roundings each: 4u
    np.testing.assert_allclose(np.asarray(adv), [a, -a, 0.0, 0.0], rtol=2.4e-7)
    np.testing.assert_array_equal(np.asarray(scored).any(1), [True, False, True, False])


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("reward.overlong", -1, r"reward\.overlong=-1 must be an integer >= 0"),
        ("reward.overlong", 600, r"reward\.overlong.*<= grpo\.max_new_tokens=512"),
        ("grpo.mask_truncated", None, r"grpo\.mask_truncated=None must be True or False"),
    ],
)
def test_config_checks(key, value, match):
    c = config_lib.load_config("configs/demo_cpu.py:experiment=False")
    c.grpo.max_new_tokens = 512
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(c)
    c[section][name] = sections.grpo_config()[name] if section == "grpo" else 0
    config_lib.validate(c)
    c.reward.overlong, c.grpo.mask_truncated = 512, True  # the whole budget; both on
    config_lib.validate(c)
