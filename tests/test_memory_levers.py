"""Memory levers of issue 13 that change no result beyond rounding.

The rollout's weight copy (`grpo.rollout_copy`): the loop samples from a copy of the weight
matrices in the compute dtype, made once per rollout, instead of reading the float32 master
weights at every decoding step.

- the copy holds every rank >= 2 floating parameter in bfloat16 and the rest (norm scales,
  biases) unchanged, each with its sharding (8 simulated devices, FSDP x tensor);
- sampling from it gives the master weights' tokens and log-probs exactly: every layer casts
  its weights to the compute dtype anyway;
- `rollout_copy=True` where there is nothing to narrow is rejected; None copies only then.

The reference in host memory (`grpo.reference_memory = "host"`): its parameters live in pinned
host memory with the policy's shardings and are brought to the devices inside the programs
that read them; the train step and the reference log-probs are bit-identical to the
device-placed reference's, and the reference stays on the host across steps.

Adam's first moment in bfloat16 (`optim.mu_dtype`): the moment is stored in bfloat16, the
second moment and the parameters stay float32, and the first update differs from the float32
one by bfloat16 rounding only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from visionr1_jax import config_lib, sampler, sections, sharding
from visionr1_jax.models import from_pretrained, testing
from visionr1_jax.sections.training import rollout_dtype
from visionr1_jax.state import init_train_state, make_rollout_copy, shardings_of
from visionr1_jax.step import UpdateBatch, make_logprob_fn, make_train_step


def _config(dtype: str, copy: bool | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.total_steps = 1
    c.model = sections.model_config()
    c.model.dtype = dtype
    c.grpo = sections.grpo_config()
    c.grpo.rollout_copy = copy
    return c


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")


def test_copy_is_bf16_matrices_with_their_shardings_and_samples_the_same(ckpt):
    config = _config("bfloat16")
    assert rollout_dtype(config) == "bfloat16"  # the dtype's name
    mesh = sharding.make_mesh((1, 4, 2))
    with jax.set_mesh(mesh):
        model = from_pretrained(ckpt, dtype=jnp.float32, compute_dtype=jnp.bfloat16, mesh=mesh)
        graphdef, frozen, params = nnx.split(model, nnx.Nothing, ...)
        copy_params, copy_frozen = make_rollout_copy(config)((params, frozen))
        for (path, x), y in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(copy_params), strict=True
        ):
            want = jnp.bfloat16 if x.ndim >= 2 else jnp.float32
            assert y.dtype == want, (jax.tree_util.keystr(path), y.dtype)
            assert y.sharding == x.sharding, jax.tree_util.keystr(path)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x.astype(want)))
        batch = testing.prompt_batch(ckpt)
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        batch = {k: np.asarray(batch[k]) for k in keys}
        runs = []
        for p, f in ((params, frozen), (copy_params, copy_frozen)):
            out = sampler.generate(
                nnx.merge(graphdef, p, f), batch, rng=jax.random.key(3), num_generations=2,
                max_new_tokens=12, temperature=1.0, top_k=20,
            )  # fmt: skip
            runs.append(jax.device_get((out.tokens, out.mask, out.logprobs)))
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1].sum() > 0


def test_rollout_copy_settings():
    assert rollout_dtype(_config("float32")) is None  # nothing to narrow: no copy
    assert rollout_dtype(_config("bfloat16", copy=False)) is None
    assert make_rollout_copy(_config("float32")) is None
    config_lib.validate(_config("bfloat16", copy=True))
    with pytest.raises(ValueError, match=r"grpo\.rollout_copy=True has no effect"):
        config_lib.validate(_config("float32", copy=True))


LR = 1e-3


@pytest.fixture(scope="module")
def two_steps(ckpt):
    """Two GRPO train steps (β 0.04, the reference inside the step) from the checkpoint in
    three settings: `base`, `mu_bf16` (`optim.mu_dtype = "bfloat16"`) and `host_ref`
    (`grpo.reference_memory = "host"`); per setting the state's dtypes and memory kinds, the
    reference log-probs, and the parameters and metrics after each step."""
    batch = testing.prompt_batch(ckpt)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    batch = {k: np.asarray(batch[k]) for k in keys}
    g, length = 2, 6
    rows = batch["input_ids"].shape[0] * g
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 100, (rows, length)).astype(np.int32)  # small-vocab text ids
    mask = np.ones((rows, length), bool)
    adv = np.where(np.arange(rows) % 2 == 0, 1.0, -1.0).astype(np.float32)
    settings = {"base": {}, "mu_bf16": {"optim.mu_dtype": "bfloat16"},
                "host_ref": {"grpo.reference_memory": "host"}}  # fmt: skip
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    out = {}
    for name, overrides in settings.items():
        config = _config("float32")
        config.total_steps = 10
        config.grpo.num_generations = g
        config.optim = sections.optim_config()
        config.optim.learning_rate = LR
        for key, value in overrides.items():
            section, field = key.split(".")
            config[section][field] = value
        config_lib.validate(config)
        with jax.set_mesh(mesh):
            model = from_pretrained(ckpt, dtype=jnp.float32, mesh=mesh)
            graphdef, state = init_train_state(model, config, jax.random.key(0))
            adam = state.opt_state[1][0]  # clip_by_global_norm, then adamw's ScaleByAdamState
            r = {
                "mu": {x.dtype for x in jax.tree.leaves(adam.mu)},
                "nu": {x.dtype for x in jax.tree.leaves(adam.nu)},
                "ref_kinds": [{x.sharding.memory_kind for x in jax.tree.leaves(state.ref_params)}],
                "params": [jax.device_get(state.params)],
                "ref_logps": jax.device_get(make_logprob_fn(graphdef, config)(
                    state.ref_params, state.frozen, batch, tokens, mask)),
                "metrics": [],
            }  # fmt: skip
            step = make_train_step(graphdef, config, state_sharding=shardings_of(state))
            for i in range(2):
                state, metrics = step(state, UpdateBatch(batch, tokens, mask, adv))
                if i == 0:  # Adam's second moment after step 1: (1 - b2) g^2
                    r["nu1"] = jax.device_get(state.opt_state[1][0].nu)
                r["params"].append(jax.device_get(state.params))
                r["metrics"].append(jax.device_get(metrics))
                r["ref_kinds"].append(
                    {x.sharding.memory_kind for x in jax.tree.leaves(state.ref_params)}
                )
        out[name] = r
    return out


def test_bf16_first_moment_is_stored_narrow_and_rounds_the_update_only(two_steps):
    base, narrow = two_steps["base"], two_steps["mu_bf16"]
    assert base["mu"] == {jnp.dtype(jnp.float32)} and narrow["mu"] == {jnp.dtype(jnp.bfloat16)}
    assert narrow["nu"] == {jnp.dtype(jnp.float32)}
    moved = {
        name: [b - a for a, b in zip(jax.tree.leaves(r["params"][0]),
                                     jax.tree.leaves(r["params"][1]), strict=True)]
        for name, r in (("base", base), ("narrow", narrow))
    }  # fmt: skip
    # Step 1 of Adam moves each weight by lr * g / (|g| + eps) (bias-corrected m = (1 - b1) g
    # and v = (1 - b2) g^2): storing m in bfloat16 changes it by at most its unit roundoff
    # 2^-9, so the move by lr * 2^-9 at most, plus the float32 rounding of each updated weight
    # (half an ulp, |w| 2^-24, on each side). Compared where |g| >= 100 eps in both runs: a
    # gradient near eps is rounding noise (a sum that cancels), which the two separately
    # compiled steps need not share, and the move there depends on it; it is bounded by lr.
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(base["params"][0]))  # ~4.3
    grad = lambda r: [np.sqrt(v / (1 - 0.999)) for v in jax.tree.leaves(r["nu1"])]
    compared = 0
    for a, b, ga, gb in zip(moved["base"], moved["narrow"], grad(base), grad(narrow),
                            strict=True):  # fmt: skip
        sure = (ga >= 1e-6) & (gb >= 1e-6)
        np.testing.assert_allclose(b[sure], a[sure], rtol=0, atol=LR * 2.0**-9 + scale * 2.0**-23)
        assert np.all(np.abs(b) <= LR * (1 + 2.0**-9) + scale * 2.0**-23)
        compared += int(sure.sum())
    assert compared > 0.5 * sum(x.size for x in moved["narrow"])  # 90% here (unused rows: 0)
    assert max(np.abs(x).max() for x in moved["narrow"]) > 0.5 * LR


def test_reference_in_host_memory_changes_no_result(two_steps):
    base, host = two_steps["base"], two_steps["host_ref"]
    assert all(kinds == {"device"} for kinds in base["ref_kinds"])
    assert all(kinds == {"pinned_host"} for kinds in host["ref_kinds"])  # before and after
    want = (base["ref_logps"], base["metrics"], base["params"])
    got = (host["ref_logps"], host["metrics"], host["params"])
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    assert host["metrics"][1]["kl"] > 0  # the reference was read: the policy moved away from it
    config = _config("float32")
    config.grpo.beta = 0.0
    config.grpo.reference_memory = "host"
    with pytest.raises(ValueError, match="reference_memory"):
        config_lib.validate(config)
