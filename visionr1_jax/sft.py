"""Supervised fine-tuning (SFT) on the detection data: the warm start before GRPO (issue #10).

The target of each prompt is its ground-truth answer, written as the reference's SFT collate
writes it (Vision-R1 `vision_r1/sft_qwen.py`, `collate_fn`), followed by `<|im_end|>`, the
token that ends the assistant turn::

    ```json
    [
    \t{"bbox_2d": [x1, y1, x2, y2], "label": "cat"},
    \t{"bbox_2d": [x1, y1, x2, y2], "label": "dog"}
    ]
    ```<|im_end|>

Coordinates are in the model's answer frame (`data.frame`, or the template's default): for
`qwen25_abs` the reference's `int(x / W * w_in)` (truncated toward zero, float64) with (h_in,
w_in) the resized model input; the reference has no SFT code for `rel1000` and `norm01`, which
take `data.templates.boxes_to_frame` (rounded). Labels are JSON-quoted (the reference pastes the
raw string, which is the same text for every label without a quote, backslash or control
character).

Differences from the reference, on purpose: the loss is on the answer tokens and `<|im_end|>`
only (the issue's rule; the reference's collate labels every token but pads and
`<|image_pad|>`, so it also trains on the system/user prompt and on a trailing
`<|im_start|>assistant\\n` that `apply_chat_template(..., add_generation_prompt=True)` appends
after the answer); and the frame is the model input of the run's own resize (the reference
takes the size of `qwen_vl_utils`' resize, which equals the processor's for images below both
pixel bounds).

The update is `step.make_train_step(graphdef, config, objective="sft")` (same state, optimizer,
sharding and step factory as GRPO): `step.sft_loss`, the token-mean NLL of the answer tokens,
teacher-forced after the prompt, one row per prompt (G = 1). `sft_update` turns a pipeline
batch into the step's `UpdateBatch` (the targets go to the devices by one explicit transfer each).
Held-out evaluation is the one evaluator's (`evaluate.evaluate`, `eval.every`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from visionr1_jax import host, sharding
from visionr1_jax.data.config import frame_of
from visionr1_jax.data.pipeline import HostBatch
from visionr1_jax.data.templates import sft_answer as answer_text
from visionr1_jax.step import UpdateBatch, model_inputs

END_OF_TURN = "<|im_end|>"
MIN_ANSWER_BUCKET = 16  # smallest target length L (as the sampler's completion buckets)


# --------------------------------------------------------------------------------------------
# Targets


def _bucket(n: int, cap: int) -> int:
    """The next power of two >= max(n, MIN_ANSWER_BUCKET), at most `cap`."""
    return min(max(MIN_ANSWER_BUCKET, 1 << max(n - 1, 0).bit_length()), cap)


def _end_of_turn_id(tokenizer: Any) -> int:
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eot is None or eot == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {END_OF_TURN} token")
    return int(eot)


def _pad_id(tokenizer: Any) -> int:
    """Filler after the targets (masked): the pad token, else `<|im_end|>`."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else _end_of_turn_id(tokenizer)


def answer_tokens(
    host_batch: HostBatch,
    tokenizer: Any,
    config: ml_collections.ConfigDict,
    max_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The SFT targets of a pipeline batch: answer tokens then `<|im_end|>`, right-padded.

    Args:
      host_batch: the pipeline's `HostBatch` (b rows; gt_boxes in original pixels,
        image_size, input_size, labels, valid).
      tokenizer: the checkpoint's tokenizer (`processor.tokenizer`).
      config: the run config (`data` for the frame, `sft.max_answer_len`).
      max_len: cap on L (None: `config.sft.max_answer_len`).
    Returns:
      tokens i32[b, L] (pad id after the answer) and mask bool[b, L] (True on the answer
      tokens and `<|im_end|>`; all False for padding rows). L = the next power of two >= the
      longest target (at least 16), at most `max_len`; longer targets are cut at L.
    """
    tokens, mask, _ = _answer_tokens(host_batch, tokenizer, config, max_len)
    return tokens, mask


def _answer_tokens(host_batch, tokenizer, config, max_len):
    """`answer_tokens` and the full target lengths i64[b] (0 for padding rows)."""
    if max_len is None:
        max_len = int(config.sft.max_answer_len) if "sft" in config else 1024
    frame = frame_of(config.data)
    a = host_batch.arrays
    rows = a["valid"].shape[0]
    eot = _end_of_turn_id(tokenizer)
    texts = {}
    for i in np.nonzero(a["valid"])[0]:
        n = int(a["gt_mask"][i].sum())
        texts[int(i)] = answer_text(
            a["gt_boxes"][i, :n],
            host_batch.labels[i],
            frame,
            tuple(int(v) for v in a["image_size"][i]),
            tuple(int(v) for v in a["input_size"][i]),
        )
    ids = {}
    if texts:
        encoded = tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"]
        ids = {i: [*e, eot] for i, e in zip(texts, encoded, strict=True)}
    lengths = np.zeros((rows,), np.int64)
    for i, seq in ids.items():
        lengths[i] = len(seq)
    length = _bucket(int(lengths.max(initial=1)), int(max_len))
    tokens = np.full((rows, length), _pad_id(tokenizer), np.int32)
    mask = np.zeros((rows, length), bool)
    for i, seq in ids.items():
        k = min(len(seq), length)
        tokens[i, :k] = seq[:k]
        mask[i, :k] = True
    return tokens, mask, lengths


# --------------------------------------------------------------------------------------------
# Update


def sft_update(
    host_batch: HostBatch,
    arrays: Mapping[str, Any],
    tokenizer: Any,
    config: ml_collections.ConfigDict,
    step: int,
) -> tuple[UpdateBatch, dict[str, float]]:
    """The SFT `UpdateBatch` of a pipeline batch, and its target metrics.

    Args:
      host_batch: this host's `HostBatch` (the ground truth).
      arrays: the same batch's global arrays (`pipeline.DeviceBatch.arrays`: B rows,
        `pixel_values` f32[B, S, F]); only `step.MODEL_KEYS` go into the update.
      tokenizer: the checkpoint's tokenizer.
      config: the run config (`data` frame, `sft.max_answer_len`).
      step: the optimizer step (keys the processes' agreement on L).
    Returns:
      `(update, metrics)`: tokens/mask i32/bool[B, L] laid out like the prompts' rows;
      `sft/answer_len` (L) and `sft/truncated` (this host's rows whose target was cut at
      `sft.max_answer_len`).
    """
    tokens, mask, lengths = _answer_tokens(host_batch, tokenizer, config, None)
    truncated = int((lengths > tokens.shape[1]).sum())
    length = max(host.kv_allgather(f"visionr1_sft/{step}", tokens.shape[1], series="sft"))
    if length > tokens.shape[1]:  # pad L to the largest of all processes (multi-host runs)
        extra = length - tokens.shape[1]
        tokens = np.pad(tokens, ((0, 0), (0, extra)), constant_values=_pad_id(tokenizer))
        mask = np.pad(mask, ((0, 0), (0, extra)))
    ids = arrays["input_ids"]
    rows = sharding.rows_sharding(ids.sharding.mesh)
    n = ids.shape[0]
    tokens, mask = host.global_rows(rows, tokens, n), host.global_rows(rows, mask, n)
    update = UpdateBatch(model_inputs(arrays), tokens, mask)
    return update, {"sft/answer_len": float(length), "sft/truncated": float(truncated)}


__all__ = ["END_OF_TURN", "answer_text", "answer_tokens", "sft_update"]
