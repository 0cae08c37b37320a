"""What crosses between the stages of a GRPO iteration, checked directly (issue 24):

- the loop's device work runs under `jax.transfer_guard("disallow")`: every host-device copy
  is an explicit `device_put` / `device_get` (a hidden one fails), for GRPO and SFT;
- the reference pass reads the reference parameters: the `ref_logps` the update receives are
  the teacher-forced log-probs of `state.ref_params`, not of the policy;
- each advantage reaches its own completion: the update's row r carries the group advantage of
  the reward of the completion whose tokens are in its row r (a reward that is a function of
  the text, so a shift by one group or one row is seen).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from test_train_loop import ckpt, data_dir, loop_config  # noqa: F401  (fixtures)

from visionr1_jax import grpo, rollout, scoring, sections, train
from visionr1_jax.models.logprobs import completion_logprobs


def _spy_steps(job):
    """Records the `UpdateBatch` of each train-step call (as host arrays, before donation)."""
    seen = []
    step = job.programs.train_step

    def spy(state, update):
        seen.append(jax.device_get(update))
        return step(state, update)

    job.programs.train_step = spy
    return seen


def _text_reward(job):
    """A reward that varies between an untrained model's completions: the share of the
    characters of each text that are in the first half of the alphabet (padding rows 0)."""
    config = job.config

    def score(host_batch, completions, step):
        terms = rollout.score_rows(host_batch, completions, config.reward, step)
        share = [sum("a" <= ch <= "m" for ch in t.lower()) / max(len(t), 1) for t in completions]
        terms["reward/total"] = np.asarray(share, np.float32) * terms["valid"]
        return terms

    return score


def test_the_loop_makes_no_hidden_transfer(ckpt, data_dir, tmp_path):  # noqa: F811
    config = loop_config(ckpt, data_dir, beta=0.04, num_iterations=2)
    config.total_steps = 4
    job = train.setup(config, str(tmp_path))
    job.programs.score_fn = _text_reward(job)
    try:
        with jax.transfer_guard("disallow"):
            for _ in range(2):
                rows = train.grpo_iteration(job, next(job.io.pipe))
                assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
            # A hidden host-to-device copy (a numpy array into a jitted function) is refused.
            with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
                jax.jit(lambda x: x + 1)(np.ones(3, np.float32))
    finally:
        job.io.pipe.close()
    assert job.step == 4 and int(jax.device_get(job.state.step)) == 4


def test_sft_iterations_make_no_hidden_transfer(ckpt, data_dir, tmp_path):  # noqa: F811
    config = loop_config(ckpt, data_dir)
    config.objective = "sft"
    config.sft = sections.sft_config()
    config.total_steps = 2
    job = train.setup(config, str(tmp_path))
    try:
        with jax.transfer_guard("disallow"):
            rows = train.sft_iteration(job, next(job.io.pipe))
    finally:
        job.io.pipe.close()
    assert rows[0]["num_tokens"] > 0 and np.isfinite(rows[0]["loss"])


def test_reference_pass_reads_the_reference_parameters(ckpt, data_dir, tmp_path):  # noqa: F811
    config = loop_config(ckpt, data_dir, beta=0.04)
    job = train.setup(config, str(tmp_path))
    # A reference that differs from the policy (as after some updates): every matrix scaled.
    ref = jax.tree.map(lambda p: p * 1.5 if p.ndim >= 2 else p, job.state.ref_params)
    job.state = dataclasses.replace(job.state, ref_params=ref)
    params, frozen = jax.device_get((job.state.params, job.state.frozen))
    ref_host = jax.device_get(ref)
    seen = _spy_steps(job)
    try:
        train.grpo_iteration(job, next(job.io.pipe))
    finally:
        job.io.pipe.close()
    (u,) = seen
    assert u.ref_logps is not None

    def logps(p):
        model = nnx.merge(job.programs.graphdef, p, frozen)
        g = u.tokens.shape[0] // u.prompts["input_ids"].shape[0]
        out = completion_logprobs(model, u.prompts, u.tokens, u.mask, num_generations=g,
                                  temperature=float(config.grpo.temperature))  # fmt: skip
        return np.asarray(out)

    of_ref, of_policy = logps(ref_host), logps(params)
    scored = u.mask.sum()
    assert scored > 0
    # Same program inputs on the same CPU: float32 round-off of the unjitted recomputation only
    # (log-probs of a tiny model are O(1-10); 1e-4 absolute is ~1e3 ulps of that scale).
    np.testing.assert_allclose(u.ref_logps, of_ref, atol=1e-4)
    # ... and far from the policy's (the scaled matrices change them by O(0.1) or more).
    assert np.abs(u.ref_logps - of_policy)[u.mask].max() > 1e-2


def test_each_advantage_reaches_its_own_completion(ckpt, data_dir, tmp_path):  # noqa: F811
    config = loop_config(ckpt, data_dir, beta=0.0)
    config.grpo.num_generations = 4
    config.grpo.max_new_tokens = 16
    job = train.setup(config, str(tmp_path))
    reward = _text_reward(job)
    job.programs.score_fn = reward
    seen = _spy_steps(job)
    try:
        device_batch = next(job.io.pipe)
        train.grpo_iteration(job, device_batch)
    finally:
        job.io.pipe.close()
    (u,) = seen
    # The reward of each row's own tokens, recomputed from the update's rows.
    texts = scoring.decode(job.io.processor.tokenizer, u.tokens, u.mask)
    mine = reward(device_batch.host, texts, 0)["reward/total"]
    g = int(config.grpo.num_generations)
    assert len(set(np.round(mine, 6))) > g, "the rewards must differ across rows and groups"
    expected = np.asarray(grpo.advantages(mine, g, estimator=config.grpo.estimator))
    # This checks routing (the kernel's values are test_grpo's). The loop's jitted program and
    # this op-by-op call round r - mean and the std differently: a few float32 ulps of the
    # rewards (<= 1, ulp 1.2e-7), divided by the group's std + 1e-4. Per row: 4 ulps / (std +
    # 1e-4); an advantage on the wrong row is off by O(0.1) (asserted below).
    std = mine.reshape(-1, g).std(1, ddof=1)
    tol = np.repeat(4 * 1.2e-7 / (std + 1e-4), g)
    assert np.all(np.abs(u.advantages - expected) <= tol), np.abs(u.advantages - expected) / tol
    shifted = np.roll(expected, g)  # a group's advantages on the next group's completions
    assert np.abs(u.advantages - shifted).max() > 1e-2
