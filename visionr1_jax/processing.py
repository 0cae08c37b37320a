"""The Qwen-VL processor built locally, chat-template prompts, left-padded static-shape batches.

The stock `Qwen2_5_VLProcessor` cannot be constructed here (its video processor needs
torchvision), so `QwenVLProcessor` is an image-only subclass around `Qwen2VLImageProcessorPil`
that returns numpy arrays. On top of it `encode_batch` pads every batch to static *buckets*
(prompt length, number of image patches, number of images) so that a run compiles a bounded
number of programs:

    proc = load_processor(ckpt_dir)
    text = render_prompt(proc, "Locate every cat ...", num_images=1)
    batch = encode_batch(proc, [text], [[image]], length_buckets=(128, 256),
                         patch_buckets=(1024, 4096), max_images=1)
    logits = model(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                   batch["attention_mask"])
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import AutoTokenizer, Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from visionr1_jax import fs

# The Qwen2-VL chat template restricted to text and images (videos are not used by this project).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class QwenVLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_processor(
    tokenizer, *, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> QwenVLProcessor:
    """Wraps `tokenizer` with a `Qwen2VLImageProcessorPil` and the chat template."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    return QwenVLProcessor(image_processor, tokenizer, chat_template=template)


def save_processor(processor: QwenVLProcessor, path: str) -> None:
    """Writes tokenizer, image-processor config and chat template into the directory `path`
    (local or remote: transformers writes locally, so a remote one is written through a
    temporary folder)."""
    if fs.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="visionr1_processor_") as local:
            save_processor(processor, local)
            fs.copy_tree(local, path)
        return
    os.makedirs(path, exist_ok=True)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    with open(os.path.join(path, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(processor.chat_template)


_local_copies: dict[str, str] = {}


def local_processor_files(path: str) -> str:
    """`path` itself when local; for a remote checkpoint a local folder holding its processor
    files (every file but the weights: tokenizer, image-processor config, chat template),
    copied once per process. transformers opens these only from a local folder; the weights
    are read remotely (`hf_weights`)."""
    if not fs.is_remote(path):
        return path
    if path not in _local_copies:
        names = [
            n
            for n in fs.listdir(path)
            if ".safetensors" not in n and not fs.isdir(fs.join(path, n))
        ]
        _local_copies[path] = fs.local_copy(path, names)
    return _local_copies[path]


def load_processor(
    path: str, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> QwenVLProcessor:
    """Builds the processor of a checkpoint directory, local or remote (`AutoProcessor` would
    only return the tokenizer). `min_pixels`/`max_pixels` override the saved resize bounds."""
    path = local_processor_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    pre = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(pre):
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kwargs)
    else:
        image_processor = Qwen2VLImageProcessorPil(**kwargs)
    template_path = os.path.join(path, CHAT_TEMPLATE_FILE)
    if os.path.exists(template_path):
        with open(template_path, encoding="utf-8") as f:
            template = f.read()
    else:
        template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    tokenizer.chat_template = template
    return QwenVLProcessor(image_processor, tokenizer, chat_template=template)


def render_prompt(
    processor: QwenVLProcessor,
    question: str,
    *,
    num_images: int = 1,
    system: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Renders one user turn (images first, then `question`) with the chat template."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    return processor.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n (buckets sorted ascending); raises if none fits."""
    i = bisect.bisect_left(list(buckets), n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return int(buckets[i])


def encode_batch(
    processor: QwenVLProcessor,
    texts: Sequence[str],
    images: Sequence[Sequence[Any]],
    *,
    length_buckets: Sequence[int] | None = None,
    patch_buckets: Sequence[int] | None = None,
    max_images: int | None = None,
    padding_side: str = "left",
) -> dict[str, np.ndarray]:
    """Tokenizes a batch of rendered prompts with their images, padded to static shapes.

    Args:
      processor: from `load_processor`.
      texts: B rendered prompts, each with one `<|image_pad|>` placeholder per image.
      images: B lists of PIL images (may be empty), in placeholder order.
      length_buckets: allowed prompt lengths T (None: the longest prompt).
      patch_buckets: allowed packed patch counts P (None: the exact count). Multiples of
        `merge_size**2`.
      max_images: number of `image_grid_thw` rows I (None: the exact count); unused rows are 0.
      padding_side: "left" (prompts for generation) or "right".

    Returns:
      input_ids i32[B, T], attention_mask i32[B, T], pixel_values f32[P, C*2*14*14],
      image_grid_thw i32[I, 3].
    """
    flat = [im for row in images for im in row]
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = padding_side
    try:
        out = processor(text=list(texts), images=flat or None, padding=True, return_tensors="np")
    finally:
        tok.padding_side = old_side
    ids = np.asarray(out["input_ids"], np.int32)
    mask = np.asarray(out["attention_mask"], np.int32)
    b, t = ids.shape
    t_pad = bucket(t, length_buckets) if length_buckets else t
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    if t_pad > t:
        fill = np.full((b, t_pad - t), pad_id, np.int32)
        zeros = np.zeros((b, t_pad - t), np.int32)
        if padding_side == "left":
            ids, mask = np.concatenate([fill, ids], 1), np.concatenate([zeros, mask], 1)
        else:
            ids, mask = np.concatenate([ids, fill], 1), np.concatenate([mask, zeros], 1)
    ip = processor.image_processor
    feat = 3 * ip.temporal_patch_size * ip.patch_size**2
    if flat:
        pixels = np.asarray(out["pixel_values"], np.float32)
        grid = np.asarray(out["image_grid_thw"], np.int32)
    else:
        pixels = np.zeros((0, feat), np.float32)
        grid = np.zeros((0, 3), np.int32)
    p = pixels.shape[0]
    p_pad = bucket(p, patch_buckets) if patch_buckets else p
    if p_pad % ip.merge_size**2:
        raise ValueError(f"patch bucket {p_pad} is not a multiple of merge_size**2")
    pixels = np.concatenate([pixels, np.zeros((p_pad - p, feat), np.float32)], 0)
    n_img = grid.shape[0] if max_images is None else max_images
    if grid.shape[0] > n_img:
        raise ValueError(f"{grid.shape[0]} images exceed max_images={n_img}")
    grid = np.concatenate([grid, np.zeros((n_img - grid.shape[0], 3), np.int32)], 0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_grid_thw": grid,
    }


def processor_summary(processor: QwenVLProcessor) -> str:
    """A one-line JSON description (vocabulary, resize bounds) for logs."""
    ip = processor.image_processor
    return json.dumps(
        {
            "vocab": len(processor.tokenizer),
            "min_pixels": ip.size.get("shortest_edge"),
            "max_pixels": ip.size.get("longest_edge"),
            "merge_size": ip.merge_size,
        }
    )
