"""Logit parity of our Flax NNX Qwen-VL with transformers (PyTorch fp32 CPU), export round trip,
bf16 loading and the chunked log-prob head."""

import jax.numpy as jnp
import numpy as np
import pytest

from visionr1_jax.models import from_pretrained, save_pretrained, testing
from visionr1_jax.models.testing import tiny_checkpoint

CONFIGS = ["qwen2_5_vl_tiny", "qwen2_5_vl_gqa4", "qwen2_5_vl_mha", "qwen2_vl_tiny"]
forward = testing.jit_forward()


def _ours(path, batch, **kwargs):
    model = from_pretrained(path, **kwargs)
    out = forward(
        model, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
        batch["attention_mask"],
    )  # fmt: skip
    return model, np.asarray(out)


def _flat_params(model):
    from flax import nnx

    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _max_err(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path_factory, name):
    path = tiny_checkpoint(tmp_path_factory, name)
    batch = testing.prompt_batch(path)
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padding is exercised
    assert len(set(map(tuple, batch["image_grid_thw"]))) == 4  # four different image sizes
    _, ours = _ours(path, batch)
    ref = testing.hf_logits(path, batch)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert _max_err(ours, ref, batch["attention_mask"]) <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers_text_only_row(tmp_path_factory, side):
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    batch = testing.prompt_batch(path, padding_side=side, seed=1, text_only_row=True)
    pad_col = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, pad_col] == 0).any()
    _, ours = _ours(path, batch)
    assert _max_err(ours, testing.hf_logits(path, batch), batch["attention_mask"]) <= 1e-4


def test_export_round_trip(tmp_path_factory, tmp_path):
    from transformers import AutoModelForImageTextToText

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_gqa4")  # tied embeddings
    batch = testing.prompt_batch(path)
    model, ours = _ours(path, batch)
    save_pretrained(model, str(tmp_path))
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path)).eval()
    ref = testing.hf_logits(str(tmp_path), batch, hf_model=hf)
    assert _max_err(ours, ref, batch["attention_mask"]) <= 1e-5
    # And back: our loader reads what we wrote, bit for bit.
    again = _flat_params(from_pretrained(str(tmp_path)))
    params = _flat_params(model)
    assert again.keys() == params.keys() and len(params) > 50
    for key, value in params.items():
        np.testing.assert_array_equal(again[key], value)


def test_bf16_checkpoint_loads(tmp_path_factory):
    import torch
    from transformers import AutoModelForImageTextToText

    path = tiny_checkpoint(tmp_path_factory, "qwen2_vl_tiny", dtype="bfloat16")
    batch = testing.prompt_batch(path)
    _, ours = _ours(path, batch)  # bf16 on disk, fp32 parameters
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    ref = testing.hf_logits(path, batch, hf_model=hf)
    assert _max_err(ours, ref, batch["attention_mask"]) <= 1e-4
    model_bf16 = from_pretrained(path, dtype=jnp.bfloat16)
    dtypes = {v.dtype for v in _flat_params(model_bf16).values()}
    assert dtypes == {np.dtype(jnp.bfloat16)}


def test_token_logprobs_equal_log_softmax(tmp_path_factory):
    from flax import nnx

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny")
    batch = testing.prompt_batch(path)
    model, logits = _ours(path, batch)
    targets = np.roll(batch["input_ids"], -1, axis=1)
    fn = nnx.jit(
        lambda m, ids, pv, g, am, y: m.token_logprobs(ids, pv, g, am, y, chunk_size=16),
    )
    got = np.asarray(
        fn(model, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
           batch["attention_mask"], targets)
    )  # fmt: skip
    mx = logits.max(-1, keepdims=True)
    ls = logits - mx - np.log(np.exp(logits - mx).sum(-1, keepdims=True))
    want = np.take_along_axis(ls, targets[..., None], -1)[..., 0]
    m = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[m], want[m], atol=1e-5, rtol=0)
