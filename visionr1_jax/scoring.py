"""Completions → reward terms: the one scoring path of the rollout and the evaluator.

`score(completions, targets, reward_config, step)` parses each answer as the reward does
(`rewards.prepare`), runs the jitted reward of `reward_config` with the thresholds of `step`
(`rewards.score`: one explicit transfer each way) and names the per-completion terms as the
metrics do. `decode` and `truncated` are the host side of a rollout's tokens: text with the
special tokens skipped, and the rows cut at the token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from visionr1_jax import rewards
from visionr1_jax.data.config import frame_of

# The terms of the reward families (vision_r1, visual_rft; perception_r1), logged as reward/<x>.
FAMILY_TERMS = ("format", "recall", "precision", "iou_accuracy",
                "f1", "classification", "location", "penalty")  # fmt: skip
# The reward's statistics of an answer under the metrics' names.
RENAMED = {
    "matched_iou_mean": "matched_iou",
    "matched_giou_mean": "matched_giou",
    "num_pred": "boxes/pred",
    "num_gt": "boxes/gt",
    "num_matched": "boxes/matched",
}

# Terms the evaluation reads and a rollout's metrics leave out (their keys stay the loop's).
EVALUATION_ONLY = ("boxes/parsed",)


def reward_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's reward section, or (a config without one: SFT, evaluation) the `official`
    reward in the data's frame."""
    if "reward" in config:
        return config.reward
    c = rewards.default_config("official")
    c.frame = frame_of(config.data)
    return c


def score(
    completions: Sequence[str],
    targets: Sequence[rewards.Target],
    reward_config: ml_collections.ConfigDict,
    step: int = 0,
) -> dict[str, np.ndarray]:
    """The reward terms of each completion against its target (one target per completion).

    Returns f32[C] arrays: `reward/total`, each term of the reward family (`reward/format`,
    `reward/recall`, `reward/precision` for Vision-R1), `parse_rate` (the official format
    check passed), `parse_failure` (the configured check failed), `matched_iou` and
    `matched_giou` (mean over the completion's matched pairs), `boxes/pred`, `boxes/gt`,
    `boxes/matched`, `boxes/parsed` (boxes parsed from the answer), and the thresholds in
    force `threshold/*` (the same in every row).
    """
    out = rewards.score(completions, targets, step=step, config=reward_config)
    total = out["total"]
    f32 = lambda x: np.broadcast_to(np.asarray(x, np.float32), total.shape).copy()
    terms = {"reward/total": f32(total)}
    terms |= {f"reward/{k}": f32(out[k]) for k in FAMILY_TERMS if k in out}
    terms["parse_rate"] = f32(out["format_official"])
    terms["parse_failure"] = 1.0 - f32(out["format_checked"])
    terms |= {new: f32(out[old]) for old, new in RENAMED.items() if old in out}
    terms["boxes/parsed"] = f32(out["num_parsed"])
    terms |= {k: f32(v) for k, v in out.items() if k.startswith("threshold/")}
    return terms


def decode(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    """Each row's generated tokens as text, special tokens skipped (a trailing `<|im_end|>`
    would fail the official format check's `json.loads`). tokens, mask: [R, L]."""
    rows = [t[m].tolist() for t, m in zip(tokens, mask, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def truncated(tokens: np.ndarray, mask: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """bool[R]: rows whose last generated token is not a stop token (cut at the budget)."""
    n = mask.sum(1)
    last = tokens[np.arange(len(tokens)), np.maximum(n - 1, 0)]
    return (n == 0) | ~np.isin(last, np.asarray(list(eos_ids) or [-1]))
