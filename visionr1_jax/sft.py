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

The update is `train.make_train_step(graphdef, config, objective="sft")` (same state, optimizer,
sharding and step factory as GRPO): `train.sft_loss`, the token-mean NLL of the answer tokens,
teacher-forced after the prompt, one row per prompt (G = 1). `sft_iteration` runs one update
from a pipeline batch; `evaluate` measures held-out parse rate and matched IoU with greedy
decoding and the reward's parser and matcher.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from visionr1_jax import rewards, sampler, train
from visionr1_jax.data import templates
from visionr1_jax.data.config import frame_of
from visionr1_jax.data.pipeline import HostBatch, PixelNormalizer

END_OF_TURN = "<|im_end|>"
MIN_ANSWER_BUCKET = 16  # smallest target length L (as the sampler's completion buckets)
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


# --------------------------------------------------------------------------------------------
# Config


def sft_config() -> ml_collections.ConfigDict:
    """The `sft` config section (read when `config.objective == "sft"`).

    Fields:
      max_answer_len: the longest target L in tokens, `<|im_end|>` included (1024: 30 boxes
        of ~25 Qwen tokens each fit). L is the next power of two >= the batch's longest
        answer (at least 16), capped here; a longer answer is truncated (no `<|im_end|>`)
        and counted as `sft/truncated`.
      eval_every: steps between held-out evaluations in the loop (0: none).
      eval_batches: batches of the evaluation split per evaluation (None: the whole split).
      eval_max_new_tokens: greedy token budget of an evaluation (512, SPEC §7).
    """
    c = ml_collections.ConfigDict()
    c.max_answer_len = 1024
    c.eval_every = 0
    c.eval_batches = ml_collections.config_dict.placeholder(int)
    c.eval_max_new_tokens = 512
    return c


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks the `sft` section (when present); returns config.

    A value without effect is an error: an `sft` section that differs from `sft_config()`
    when `config.objective` is not `sft`, and `eval_batches` / `eval_max_new_tokens` changed
    while `eval_every == 0` (no evaluation runs).
    """
    if "sft" not in config:
        return config
    c = config.sft

    def fail(key: str, value: Any, why: str) -> None:
        raise ValueError(f"sft.{key}={value!r} {why}")

    known = set(sft_config().keys())
    for key in c.keys():
        if key not in known:
            fail(key, c[key], f"is not an sft key; known: {sorted(known)}")
    objective = config.get("objective", "sft")
    if objective != "sft":
        default = sft_config()
        for key in sorted(known):
            if c.get(key) != default[key]:
                fail(key, c.get(key), f"has no effect with objective={objective!r}")
    if not _is_int(c.max_answer_len) or c.max_answer_len < 1:
        fail("max_answer_len", c.max_answer_len, "must be an int >= 1")
    if not _is_int(c.eval_every) or c.eval_every < 0:
        fail("eval_every", c.eval_every, "must be an int >= 0 (0: no evaluation)")
    if c.eval_batches is not None and (not _is_int(c.eval_batches) or c.eval_batches < 1):
        fail("eval_batches", c.eval_batches, "must be None (whole split) or an int >= 1")
    if not _is_int(c.eval_max_new_tokens) or c.eval_max_new_tokens < 1:
        fail("eval_max_new_tokens", c.eval_max_new_tokens, "must be an int >= 1")
    if c.eval_every == 0:
        default = sft_config()
        for key in ("eval_batches", "eval_max_new_tokens"):
            if c[key] != default[key]:
                fail(key, c[key], "has no effect with sft.eval_every=0 (no evaluation runs)")
    return config


# --------------------------------------------------------------------------------------------
# Targets


def answer_text(
    boxes: np.ndarray,
    labels: Sequence[str],
    frame: str,
    image_size: tuple[int, int],
    input_size: tuple[int, int],
) -> str:
    """One SFT answer as the reference's collate writes it (see the module docstring).

    Args:
      boxes: f32[N, 4] xyxy in original image pixels.
      labels: N label strings.
      frame: the answer frame (`templates.FRAMES`).
      image_size: original (H, W); input_size: resized model input (h_in, w_in).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(labels) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    if frame == "qwen25_abs":
        (h, w), (h_in, w_in) = image_size, input_size
        coords = (boxes / np.array([w, h, w, h]) * np.array([w_in, h_in, w_in, h_in])).astype(int)
        values = coords.tolist()
    else:
        coords = templates.boxes_to_frame(boxes, frame, image_size, input_size)
        cast = (lambda v: round(float(v), 3)) if frame == "norm01" else (lambda v: int(v))
        values = [[cast(v) for v in box] for box in coords]
    items = [
        f'{{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}], "label": {json.dumps(label)}}}'
        for b, label in zip(values, labels, strict=True)
    ]
    return "```json\n[\n\t" + ",\n\t".join(items) + "\n]\n```"


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


def _agree_on_length(tokens: np.ndarray, mask: np.ndarray, pad: int) -> tuple[Any, Any]:
    """Pads the target length L to the largest of all processes (multi-host runs)."""
    if jax.process_count() == 1:
        return tokens, mask
    from jax.experimental import multihost_utils

    mine = np.array([tokens.shape[1]])
    length = int(np.asarray(multihost_utils.process_allgather(mine)).max())
    extra = length - tokens.shape[1]
    if extra:
        tokens = np.pad(tokens, ((0, 0), (0, extra)), constant_values=pad)
        mask = np.pad(mask, ((0, 0), (0, extra)))
    return tokens, mask


def _like_rows(local: np.ndarray, ref: Any) -> Any:
    """`local` rows as a global array laid out as `ref`'s rows (the batch sharding)."""
    sharding = getattr(ref, "sharding", None)
    if isinstance(ref, jax.Array) and sharding is not None:
        spec = getattr(sharding, "spec", None)
        if spec is not None:
            sharding = jax.sharding.NamedSharding(
                sharding.mesh, jax.sharding.PartitionSpec(spec[0] if spec else None, None)
            )
        shape = (ref.shape[0], *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, shape)
    return jnp.asarray(local)


def sft_iteration(
    train_step: Callable[..., tuple[Any, dict[str, jax.Array]]],
    state: Any,
    device_batch_arrays: Mapping[str, Any],
    host_batch: HostBatch,
    tokenizer: Any,
    config: ml_collections.ConfigDict,
) -> tuple[Any, dict[str, Any]]:
    """One SFT update from a pipeline batch.

    Args:
      train_step: `train.make_train_step(graphdef, config, objective="sft")`.
      state: the `train.TrainState` (donated to the step).
      device_batch_arrays: the batch's global arrays (`InputPipeline.global_arrays`: B rows,
        `pixel_values` f32[B, S, F]); only `MODEL_KEYS` are passed to the step.
      host_batch: this host's `HostBatch` of the same batch (the ground truth).
      tokenizer: the checkpoint's tokenizer.
      config: the run config.
    Returns:
      `(state, metrics)`: the step's metrics (`loss`, `grad_norm`, `learning_rate`,
      `num_tokens`) plus `sft/answer_len` (L) and `sft/truncated` (this host's rows whose
      target was cut at `sft.max_answer_len`).
    """
    tokens, mask, lengths = _answer_tokens(host_batch, tokenizer, config, None)
    truncated = int((lengths > tokens.shape[1]).sum())
    tokens, mask = _agree_on_length(tokens, mask, _pad_id(tokenizer))
    ref = device_batch_arrays["input_ids"]
    batch = {k: device_batch_arrays[k] for k in MODEL_KEYS if k in device_batch_arrays}
    state, metrics = train_step(state, batch, _like_rows(tokens, ref), _like_rows(mask, ref))
    metrics = dict(metrics)
    metrics["sft/answer_len"] = tokens.shape[1]
    metrics["sft/truncated"] = truncated
    return state, metrics


# --------------------------------------------------------------------------------------------
# Evaluation


def _reward_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's reward config, or the `official` one in the data's frame."""
    if "reward" in config:
        return config.reward
    c = rewards.default_config("official")
    c.frame = frame_of(config.data)
    return c


def _normalizer(processor: Any) -> PixelNormalizer:
    ip = processor.image_processor
    return PixelNormalizer(
        mean=tuple(float(v) for v in ip.image_mean),
        std=tuple(float(v) for v in ip.image_std),
        rescale=float(ip.rescale_factor),
        temporal=int(ip.temporal_patch_size),
    )


def score_completions(
    completions: Sequence[str],
    targets: Sequence[rewards.Target],
    config: ml_collections.ConfigDict,
) -> dict[str, np.ndarray]:
    """Per-completion evaluation terms with the reward's parser and matcher.

    Returns numpy arrays [C]: `parsed` (passes the official format check and yields >= 1
    box), `format` (official check), `num_matched` (Hungarian pairs of the box-prior cost,
    as the reward matches), `matched_iou` (mean IoU of those pairs, 0 without pairs).
    """
    rc = _reward_config(config)
    pred, gt, parsed = rewards.prepare(completions, targets, rc)
    _, aux = rewards.make_reward_fn(rc)(pred, gt, jnp.asarray(0, jnp.int32))
    fmt = np.asarray(parsed.format_official)
    return {
        "parsed": (fmt == 1.0) & (parsed.valid.sum(1) >= 1),
        "format": fmt,
        "num_matched": np.asarray(aux["num_matched"]),
        "matched_iou": np.asarray(aux["matched_iou_mean"]),
    }


def evaluate(
    model: Any,
    processor: Any,
    host_batches: Iterable[HostBatch],
    config: ml_collections.ConfigDict,
    *,
    max_new_tokens: int,
) -> dict[str, float]:
    """Greedy answers on held-out images, parsed and matched as the reward does.

    Each batch is decoded greedily (`sampler.generate`, temperature 0, one completion per
    prompt, stop at the checkpoint's EOS ids), detokenised with special tokens skipped and
    scored by `score_completions`.

    Args:
      model: the policy (`QwenVL`).
      processor: the checkpoint's processor (tokenizer; image normalisation for uint8 batches).
      host_batches: `HostBatch`es of the evaluation pipeline (padding rows are ignored); on
        a multi-host run each host scores its own rows (the numbers are this host's).
      config: the run config (`data` frame, `reward` if present).
      max_new_tokens: the greedy token budget.
    Returns:
      `parse_rate` (fraction of answers passing the official format check with >= 1 box),
      `format_rate`, `matched_iou` (mean IoU over all matched pairs; 0 if none),
      `num_matched` (pairs), `truncated_rate` (answers that hit `max_new_tokens` without
      EOS), `num_examples`.
    """
    tokenizer = processor.tokenizer
    eos, _ = sampler.default_token_ids(model)
    normalize = None
    terms: list[dict[str, np.ndarray]] = []
    truncated = 0
    for host in host_batches:
        a = host.arrays
        valid = np.asarray(a["valid"], bool)
        if not valid.any():
            continue
        batch = {k: np.asarray(a[k]) for k in ("input_ids", "attention_mask", "image_grid_thw")}
        if "pixel_values" in a:
            batch["pixel_values"] = np.asarray(a["pixel_values"])
        else:
            normalize = normalize or _normalizer(processor)
            batch["pixel_values"] = np.asarray(normalize(jnp.asarray(a["pixel_patches"])))
        batch = {k: v[valid] for k, v in batch.items()}
        out = sampler.generate(
            model,
            batch,
            rng=jax.random.key(0),
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            cache_dtype=model.cfg.dtype,
        )
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        texts = train.decode_completions(tokenizer, tokens, mask)
        cut = train.truncated(tokens, mask, eos) & (mask.sum(1) >= max_new_tokens)
        truncated += int(cut.sum())
        terms.append(score_completions(texts, host.targets(), config))
    if not terms:
        raise ValueError("evaluate: the batches hold no valid row")
    t = {k: np.concatenate([x[k] for x in terms]) for k in terms[0]}
    pairs = float(t["num_matched"].sum())
    iou_sum = float((t["matched_iou"].astype(np.float64) * t["num_matched"]).sum())
    count = len(t["parsed"])
    return {
        "parse_rate": float(t["parsed"].mean()),
        "format_rate": float(t["format"].mean()),
        "matched_iou": iou_sum / pairs if pairs else 0.0,
        "num_matched": pairs,
        "truncated_rate": truncated / count,
        "num_examples": float(count),
    }


__all__ = [
    "END_OF_TURN",
    "answer_text",
    "answer_tokens",
    "evaluate",
    "score_completions",
    "sft_config",
    "sft_iteration",
    "validate_config",
]
