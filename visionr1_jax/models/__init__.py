"""Qwen2-VL / Qwen2.5-VL in Flax NNX: model, rope, Hugging Face weights, tiny checkpoints.

model = visionr1_jax.models.from_pretrained(path, dtype=jnp.float32, mesh=None)
logits = model(input_ids, pixel_values, image_grid_thw, attention_mask)  # f32[B, T, V]
visionr1_jax.models.save_pretrained(model, out_dir)
"""

from visionr1_jax.models import qwen_vl
from visionr1_jax.models.hf_weights import from_pretrained, save_pretrained
from visionr1_jax.models.qwen_vl import QwenVL, QwenVLConfig

__all__ = ["QwenVL", "QwenVLConfig", "from_pretrained", "model_config", "save_pretrained"]


def model_config():
    """ConfigDict section for model options, included by the run configs as `config.model`.

    Fields: `checkpoint` (local or gs:// directory; empty = write the tiny config `tiny` to the
    workdir), `tiny` (a key of `tiny.TINY_CONFIGS`), `tokenizer` ("small" or "qwen", for tiny),
    `param_dtype` / `dtype` (master weights / compute), `remat_policy` (none, full, dots,
    dots_no_batch), `scan_layers` (the decoder's layers and the vision tower's blocks under
    `lax.scan` in training and the reference pass: one layer compiled instead of all; same
    values), `logprob_chunk` (sequence chunk of the log-prob head; None = the largest chunk
    whose f32 `[B, chunk, V]` logits block fits `qwen_vl.LOGITS_BLOCK_BYTES`, B the global rows,
    which suits one host; pod configs set it), `max_image_patches` (the vision tower's static
    per-image bound; None derives it from `data.max_pixels`, see `config_lib.max_image_patches`;
    validation rejects a value below what the data produces), `freeze_vision_tower` (the tower
    gets no gradient and no optimizer state; policy and reference share it), `init_from`
    (another run's workdir, local or gs://: its trainable parameters at `init_step`, None = its
    newest checkpoint, replace the start checkpoint's and become the reference; the architecture
    and the frozen parameters still come from `checkpoint`; empty = off), `lora` (low-rank
    adapters on the decoder's projections: `rank` (0 = off), `alpha`, `targets` (of
    `qwen_vl.LORA_TARGETS`), `seed` of the A matrices; with rank > 0 only the adapters train and
    have optimizer state, the base weights stay as loaded, and the reference is the base model:
    the adapters off, no second copy of the weights).
    """
    import ml_collections

    c = ml_collections.ConfigDict()
    c.checkpoint = ""
    c.tiny = "qwen2_5_vl_tiny"
    c.tokenizer = "small"
    c.param_dtype = "float32"
    c.dtype = "bfloat16"
    c.remat_policy = "none"
    c.scan_layers = False
    c.logprob_chunk = ml_collections.config_dict.placeholder(int)
    c.max_image_patches = ml_collections.config_dict.placeholder(int)
    c.freeze_vision_tower = False
    c.init_from = ""
    c.init_step = ml_collections.config_dict.placeholder(int)
    c.lora = ml_collections.ConfigDict(
        {"rank": 0, "alpha": 16.0, "targets": qwen_vl.LORA_TARGETS, "seed": 0}
    )
    return c
