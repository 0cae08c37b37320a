"""Helpers shared by the model tests: tiny checkpoints written once per test session, and the
tolerances every model / sampler test compares with.

Tolerances (float32 unit roundoff u = 2^-24, bf16 unit roundoff 2^-9). Two float32 evaluations
of the same network (ours and transformers', or two of our code paths: cached decoding, block
attention, sharded, chunked) differ only by rounding. A length-K reduction summed in another
order (vector width, FMA contraction: what differs between CPUs) differs by about sqrt(K) u
relative; to first order the errors of successive stages add. The deepest path of a tiny
checkpoint has `FORWARD_DEPTH` = 34 rounded reductions in sequence (patch embedding; 3 vision
blocks x 6: qkv, scores, probs @ V, proj, fc1, fc2; the merger's 2 layers; 2 text layers x 6;
the head), the longest has K = 1176 (the patch embedding), so logits agree within
`LOGIT_RTOL` = 34 sqrt(1176) u = 7.0e-5 of their scale max|z| (3.1e-4 at the tiny checkpoints'
|z| <= 4.6; measured <= 1.05e-5 on an AMD EPYC). A log-prob z_y - logsumexp(z) moves by at
most twice the largest logit error, plus sqrt(V) u for the V-term sum of the log-sum-exp.
"""

from __future__ import annotations

import hashlib
import math
import os
import re

import numpy as np
from flax import nnx
from PIL import Image

from visionr1_jax import processing
from visionr1_jax.models import tiny

_CACHE: dict[tuple, str] = {}

F32_U = 2.0**-24  # float32 unit roundoff
BF16_U = 2.0**-9  # bfloat16 unit roundoff (8 significant bits)
FORWARD_DEPTH = 34  # rounded reductions in sequence on a tiny checkpoint's deepest path
MAX_REDUCTION = 1176  # longest reduction: the patch embedding (3 x 2 x 14 x 14)
LOGIT_RTOL = FORWARD_DEPTH * math.sqrt(MAX_REDUCTION) * F32_U  # 7.0e-5 of max|z|
# The tiny checkpoints draw unit-variance logits (`tiny._randomize`): |z| <= 4.6 over the test
# batches. The scale to use where a comparison has no reference logits at hand.
TINY_LOGIT_SCALE = 5.0


def logit_atol(scale: float) -> float:
    """Largest float32 rounding difference of two evaluations of a tiny checkpoint's logits of
    magnitude <= `scale` (see the module docstring)."""
    return LOGIT_RTOL * scale


def logprob_atol(scale: float, vocab: int) -> float:
    """The same for log-probs of logits of magnitude <= `scale` (after any temperature) over a
    `vocab`-token softmax: |d(z_y - lse z)| <= 2 max|dz| + the log-sum-exp's own rounding."""
    return 2 * logit_atol(scale) + math.sqrt(vocab) * F32_U


def assert_logits_close(got, want, mask=None) -> None:
    """float32 logit parity f32[B, T, V] (positions where `mask` is set), at `logit_atol` of
    the reference's own scale."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (got.shape, want.shape)
    if mask is not None:
        got, want = got[np.asarray(mask).astype(bool)], want[np.asarray(mask).astype(bool)]
    atol = logit_atol(float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= atol, f"max |logit diff| {err:.3g} > {atol:.3g}"


def assert_bf16_close(got, want, mask=None, *, roundings: int) -> None:
    """A bfloat16 computation tracks the float32 one `want`: the relative RMS error of `got` is
    at most `roundings` x 2^-9, the first-order worst case when each of the `roundings` bf16
    roundings on the deepest path adds a relative error <= 2^-9 and errors add linearly."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if mask is not None:
        got, want = got[np.asarray(mask).astype(bool)], want[np.asarray(mask).astype(bool)]
    assert np.isfinite(got).all()
    rel = float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))
    assert rel <= roundings * BF16_U, f"relative rms error {rel:.3g} > {roundings} x 2^-9"


def tiny_checkpoint(tmp_path_factory, name: str, **kwargs) -> str:
    """Path of a tiny checkpoint `name`, written on first use in this pytest session.

    `tmp_path_factory` is pytest's session-scoped factory; keyword arguments go to
    `tiny.write_tiny_checkpoint` and are part of the cache key.
    """
    key = (str(tmp_path_factory.getbasetemp()), name, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        tag = "-".join([name] + [f"{k}={v}" for k, v in sorted(kwargs.items())])
        safe = re.sub(r"[^\w.=,-]", "", tag)  # token strings such as <|im_end|> in a path
        if safe != tag:
            safe += "-" + hashlib.sha1(tag.encode()).hexdigest()[:8]
        path = os.path.join(str(tmp_path_factory.getbasetemp()), "ckpt", safe)
        _CACHE[key] = tiny.write_tiny_checkpoint(path, name, **kwargs)
    return _CACHE[key]


def random_images(rng, sizes):
    """PIL images of the given (height, width) sizes with uniform random pixels."""
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def prompt_batch(
    path: str, *, padding_side: str = "left", seed: int = 0, text_only_row: bool = False
):
    """A processor batch mixing image sizes, a two-image prompt, a one-image prompt and padding.

    Returns the numpy dict of `processing.encode_batch` (3 rows, 4 images; plus a row without
    image if `text_only_row`).
    """
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
    import torch  # optional: torch is a test-only dependency

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
    import torch  # optional: torch is a test-only dependency
    from transformers import AutoModelForImageTextToText  # optional: imports torch

    model = hf_model
    if model is None:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(**hf_inputs(batch, model))
    return out.logits.float().numpy().astype(np.float32)


def jit_forward():
    """`nnx.jit` of `model(input_ids, pixel_values, image_grid_thw, attention_mask)`."""
    return nnx.jit(lambda m, ids, pv, g, am: m(ids, pv, g, am))
