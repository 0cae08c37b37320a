"""Architectures of the released Qwen2.5-VL checkpoints, for shape-only work without weights.

`tools.aot` compiles a run for a TPU topology from shapes alone; when the run's checkpoint is
not at hand (a `gs://` path, no download here) it takes the architecture from this table. The
values are those of the releases' `config.json` on the Hugging Face hub (model_type
qwen2_5_vl; the 3B ties its input and output embeddings, the 7B does not).

    cfg = QwenVLConfig.from_hf_dict(presets.ARCHITECTURES["qwen2_5_vl_7b"])
"""

from __future__ import annotations

import os
from typing import Any

_VISION = dict(
    depth=32,
    hidden_act="silu",
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_chans=3,
    patch_size=14,
    spatial_merge_size=2,
    spatial_patch_size=14,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
)
_IDS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    bos_token_id=151643,
    eos_token_id=151645,
)


def _release(
    hidden: int, mlp: int, layers: int, heads: int, kv_heads: int, vocab: int, tie: bool
) -> dict[str, Any]:
    return dict(
        model_type="qwen2_5_vl",
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]),
        max_position_embeddings=128000,
        tie_word_embeddings=tie,
        vision_config=dict(_VISION, out_hidden_size=hidden),
        **_IDS,
    )


ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2_5_vl_3b": _release(2048, 11008, 36, 16, 2, 151936, tie=True),
    "qwen2_5_vl_7b": _release(3584, 18944, 28, 28, 4, 152064, tie=False),
}
# The hub's repository names (a checkpoint directory keeps its repository's name).
RELEASE_NAMES = {
    "qwen2.5-vl-3b-instruct": "qwen2_5_vl_3b",
    "qwen2.5-vl-7b-instruct": "qwen2_5_vl_7b",
}


def from_checkpoint_name(path: str) -> str | None:
    """The `ARCHITECTURES` key of a checkpoint path named after its release
    (`gs://b/Qwen2.5-VL-7B-Instruct` -> `qwen2_5_vl_7b`), else None."""
    return RELEASE_NAMES.get(os.path.basename(path.rstrip("/")).lower())
