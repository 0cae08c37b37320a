"""LoRA (issue 13): low-rank adapters on the decoder's projections, the only trained weights.

On the tiny checkpoint, with `model.lora.rank` > 0 and three GRPO train steps (β > 0, the
reference inside the step):

- only the adapters change: every base weight is bit-identical to the checkpoint's, the
  optimizer state holds the adapters' moments and nothing else;
- the reference log-probs (the state's `ref_params`, the adapters zeroed) equal those of the
  base model loaded without LoRA, exactly; a fresh adapted model (B = 0) too;
- the adapted model exports (`hf_weights.save_pretrained`: W + (alpha / r) A B merged) to a
  checkpoint that transformers loads with logits equal to ours within float32 parity;
- bad LoRA settings are rejected by the config check, naming the key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from visionr1_jax import config_lib, sections
from visionr1_jax.models import from_pretrained, qwen_vl, save_pretrained, testing
from visionr1_jax.sections.model import lora_options
from visionr1_jax.state import init_train_state
from visionr1_jax.step import UpdateBatch, make_logprob_fn, make_train_step

G, L, RANK, ALPHA = 2, 8, 4, 8.0


def _config(**lora) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.total_steps = 10
    c.model = sections.model_config()
    c.model.dtype = "float32"
    c.model.lora.rank = RANK
    c.model.lora.alpha = ALPHA
    c.model.lora.update(lora)
    c.grpo = sections.grpo_config()
    c.grpo.num_generations = G
    c.grpo.beta = 0.04
    c.optim = sections.optim_config()
    c.optim.learning_rate = 1e-2  # large: the adapters move visibly in three steps
    return c


def _flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")


@pytest.fixture(scope="module")
def rollout(ckpt):
    full = testing.prompt_batch(ckpt)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
    batch = {k: np.asarray(full[k]) for k in keys}
    rows = batch["input_ids"].shape[0] * G
    cfg = qwen_vl.QwenVLConfig.from_pretrained(ckpt)
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    text = np.setdiff1d(np.arange(cfg.vocab_size), [int(cfg.hf_config[k]) for k in names])
    rng = np.random.default_rng(0)
    tokens = rng.choice(text, (rows, L)).astype(np.int32)
    mask = np.arange(L)[None] < rng.integers(3, L + 1, rows)[:, None]
    adv = np.where(np.arange(rows) % 2 == 0, 1.0, -1.0).astype(np.float32)
    return batch, tokens, mask, adv


def _forward(model, batch) -> np.ndarray:
    keys = ("input_ids", "pixel_values", "image_grid_thw", "attention_mask")
    return np.asarray(testing.jit_forward()(model, *(batch[k] for k in keys)))


def _load(ckpt, config):
    return from_pretrained(ckpt, dtype=jnp.float32, **lora_options(config))


@pytest.fixture(scope="module")
def trained(ckpt, rollout):
    config = _config()
    model = _load(ckpt, config)
    graphdef, state = init_train_state(model, config, jax.random.key(0))
    start_params, start_frozen = _flat(state.params), _flat(state.frozen)
    step = make_train_step(graphdef, config)
    batch, tokens, mask, adv = rollout
    for _ in range(3):
        state, metrics = step(state, UpdateBatch(batch, tokens, mask, adv))
        assert np.isfinite(float(metrics["loss"]))
    return config, graphdef, state, start_params, start_frozen


def test_only_the_adapters_train(trained):
    config, _, state, start_params, start_frozen = trained
    params, frozen = _flat(state.params), _flat(state.frozen)
    assert params and all("lora_a" in k or "lora_b" in k for k in params)
    # 7 adapted projections x 2 layers x (A, B)
    assert len(params) == len(config.model.lora.targets) * 2 * 2
    assert not any("lora" in k for k in frozen)
    assert frozen.keys() == start_frozen.keys()
    for k, v in frozen.items():
        assert np.array_equal(v, start_frozen[k]), k  # bit-identical base weights
    moved = [k for k in params if not np.array_equal(params[k], start_params[k])]
    assert len(moved) == len(params), set(params) - set(moved)
    # Adam's moments exist for the adapters only.
    moments = [x for x in jax.tree.leaves(state.opt_state) if jnp.ndim(x) > 0]
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in moments) == 2 * n_adapter


def test_reference_is_the_base_model(ckpt, rollout, trained):
    config, graphdef, state, _, _ = trained
    batch, tokens, mask, _ = rollout
    logps = make_logprob_fn(graphdef, config)
    ref = np.asarray(logps(state.ref_params, state.frozen, batch, tokens, mask))
    base_config = _config(rank=0)
    bgraph, bstate = init_train_state(_load(ckpt, base_config), base_config, jax.random.key(0))
    base_logps = make_logprob_fn(bgraph, base_config)
    want = np.asarray(base_logps(bstate.params, bstate.frozen, batch, tokens, mask))
    # Zero adapters add exactly 0.0 to every adapted projection: the same bits.
    np.testing.assert_array_equal(ref, want)
    # the trained adapters do change the log-probs
    policy = np.asarray(logps(state.params, state.frozen, batch, tokens, mask))
    assert np.abs(policy - want)[mask].max() > 1e-4


def test_merged_export_loads_in_transformers_with_equal_logits(ckpt, trained, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, graphdef, state, _, _ = trained
    model = nnx.merge(graphdef, state.params, state.frozen)
    out = str(tmp_path / "merged")
    save_pretrained(model, out)
    batch = testing.prompt_batch(ckpt)
    ours = _forward(model, batch)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    theirs = testing.hf_logits(out, batch, hf)
    testing.assert_logits_close(ours, theirs, np.asarray(batch["attention_mask"]).astype(bool))
    # ... and the adapters moved the logits away from the base checkpoint's
    base = testing.hf_logits(ckpt, batch)
    assert np.abs(theirs - base).max() > 1e-4


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"rank": -1}, "model.lora.rank"),
        ({"rank": 2, "targets": ("q_proj", "qkv")}, "model.lora.targets"),
        ({"rank": 2, "targets": ()}, "no effect"),
        ({"rank": 2, "alpha": 0.0}, "model.lora.alpha"),
    ],
)
def test_bad_lora_settings_are_rejected(lora, message):
    c = _config(**lora)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)


def test_lora_with_a_frozen_tower_is_rejected():
    c = _config()
    c.model.freeze_vision_tower = True
    with pytest.raises(ValueError, match="freeze_vision_tower has no effect"):
        config_lib.validate(c)


def test_fresh_adapters_leave_the_model_unchanged(ckpt):
    batch = testing.prompt_batch(ckpt)
    adapted = _load(ckpt, _config())
    assert any(isinstance(v, qwen_vl.LoRAParam) for _, v in nnx.to_flat_state(nnx.state(adapted)))
    base = _load(ckpt, _config(rank=0))
    np.testing.assert_array_equal(_forward(adapted, batch), _forward(base, batch))
