"""Release-size configs (hub `config.json` layout): our parse agrees with transformers, the
abstract model has exactly transformers' parameter count, and the rules table shards it."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from visionr1_jax import sharding
from visionr1_jax.models import hf_weights, qwen_vl

# Hub layout (transformers 4.x era): text fields at top level, `rope_scaling` with mrope.
QWEN2_5_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

QWEN2_VL_2B = {
    "model_type": "qwen2_vl",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "image_token_id": 151655,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def _hf_param_count(cfg_dict):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    if cfg_dict["model_type"] == "qwen2_5_vl":
        config, cls = Qwen2_5_VLConfig(**cfg_dict), Qwen2_5_VLForConditionalGeneration
    else:
        config, cls = Qwen2VLConfig(**cfg_dict), Qwen2VLForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    names = {n for n, _ in model.named_parameters()}  # tied weights are listed once
    return config, sum(p.numel() for n, p in model.named_parameters() if n in names)


@pytest.mark.parametrize(
    "cfg_dict", [QWEN2_5_VL_7B, QWEN2_VL_2B], ids=["qwen2.5-vl-7b", "qwen2-vl-2b"]
)
def test_release_config_matches_transformers(cfg_dict):
    ours = qwen_vl.QwenVLConfig.from_hf_dict(cfg_dict)
    hf_config, n_params = _hf_param_count(cfg_dict)
    text = hf_config.text_config
    assert ours.hidden_size == text.hidden_size and ours.num_layers == text.num_hidden_layers
    assert ours.num_kv_heads == text.num_key_value_heads
    assert ours.rope_theta == text.rope_parameters["rope_theta"]
    assert ours.mrope_section == tuple(text.rope_parameters["mrope_section"])
    assert ours.tie_word_embeddings == hf_config.tie_word_embeddings
    abstract = hf_weights.abstract_model(ours)
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    ours_count = sum(int(np.prod(v.get_value().shape)) for _, v in flat)
    assert ours_count == n_params
    # Every parameter maps to a hub checkpoint key.
    keys = {hf_weights.hf_key(p) for p, _ in flat}
    assert len(keys) == len(flat)


def test_release_model_is_sharded_by_the_rules():
    mesh = sharding.make_mesh((2, 2, 2))
    abstract = hf_weights.abstract_model(qwen_vl.QwenVLConfig.from_hf_dict(QWEN2_5_VL_7B))
    shardings = qwen_vl.param_shardings(abstract, mesh)
    state = nnx.state(abstract, nnx.Param)
    total = sharded = 0
    for (_, var), sh in zip(nnx.to_flat_state(state), jax.tree.leaves(shardings), strict=True):
        size = int(np.prod(var.get_value().shape))
        per_device = int(np.prod(sh.shard_shape(var.get_value().shape)))
        total += size
        sharded += per_device
    # Embeddings, projections and MLPs split four ways (fsdp x tensor): < 30% per device.
    assert sharded / total < 0.3
