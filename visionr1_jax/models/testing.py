"""Helpers shared by the model tests: tiny checkpoints written once per test session."""

from __future__ import annotations

import os

from visionr1_jax.models import tiny

_CACHE: dict[tuple, str] = {}


def tiny_checkpoint(tmp_path_factory, name: str, **kwargs) -> str:
    """Path of a tiny checkpoint `name`, written on first use in this pytest session.

    `tmp_path_factory` is pytest's session-scoped factory; keyword arguments go to
    `tiny.write_tiny_checkpoint` and are part of the cache key.
    """
    key = (str(tmp_path_factory.getbasetemp()), name, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        tag = "-".join([name] + [f"{k}={v}" for k, v in sorted(kwargs.items())])
        path = os.path.join(str(tmp_path_factory.getbasetemp()), "ckpt", tag)
        _CACHE[key] = tiny.write_tiny_checkpoint(path, name, **kwargs)
    return _CACHE[key]


def random_images(rng, sizes):
    """PIL images of the given (height, width) sizes with uniform random pixels."""
    import numpy as np
    from PIL import Image

    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def prompt_batch(
    path: str, *, padding_side: str = "left", seed: int = 0, text_only_row: bool = False
):
    """A processor batch mixing image sizes, a two-image prompt, a one-image prompt and padding.

    Returns the numpy dict of `processing.encode_batch` (3 rows, 4 images; plus a row without
    image if `text_only_row`).
    """
    import numpy as np

    from visionr1_jax import processing

    proc = processing.load_processor(path)
    rng = np.random.default_rng(seed)
    ims = random_images(rng, [(100, 150), (224, 168), (60, 60), (300, 120)])
    texts = [
        processing.render_prompt(proc, "Locate every cat and every dog.", num_images=2),
        processing.render_prompt(proc, "hi", num_images=1),
        processing.render_prompt(proc, "Find the red square please.", num_images=1),
    ]
    images = [ims[:2], ims[2:3], ims[3:]]
    if text_only_row:
        texts.append(processing.render_prompt(proc, "No picture in this one.", num_images=0))
        images.append([])
    return processing.encode_batch(proc, texts, images, padding_side=padding_side)


def hf_inputs(batch, hf_model) -> dict:
    """The keyword tensors a transformers Qwen-VL model takes for a processor batch."""
    import torch

    ids = torch.tensor(batch["input_ids"]).long()
    return dict(
        input_ids=ids,
        attention_mask=torch.tensor(batch["attention_mask"]).long(),
        pixel_values=torch.tensor(batch["pixel_values"]),
        image_grid_thw=torch.tensor(batch["image_grid_thw"]).long(),
        mm_token_type_ids=(ids == hf_model.config.image_token_id).long(),
    )


def hf_logits(path: str, batch, hf_model=None):
    """Logits f32[B, T, V] of the transformers (PyTorch, fp32, CPU) model at `path`."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText

    model = hf_model
    if model is None:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(**hf_inputs(batch, model))
    return out.logits.float().numpy().astype(np.float32)


def jit_forward():
    """`nnx.jit` of `model(input_ids, pixel_values, image_grid_thw, attention_mask)`."""
    from flax import nnx

    return nnx.jit(lambda m, ids, pv, g, am: m(ids, pv, g, am))
