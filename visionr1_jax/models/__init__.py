"""Qwen2-VL / Qwen2.5-VL in Flax NNX: model, rope, Hugging Face weights, tiny checkpoints.

model = visionr1_jax.models.from_pretrained(path, dtype=jnp.float32, mesh=None)
logits = model(input_ids, pixel_values, image_grid_thw, attention_mask)  # f32[B, T, V]
visionr1_jax.models.save_pretrained(model, out_dir)
"""

from visionr1_jax.models import qwen_vl
from visionr1_jax.models.hf_weights import from_pretrained, save_pretrained
from visionr1_jax.models.qwen_vl import QwenVL, QwenVLConfig

__all__ = ["QwenVL", "QwenVLConfig", "from_pretrained", "qwen_vl", "save_pretrained"]
