"""One GRPO rollout: generate → decode → score → advantages, yielding the `UpdateBatch` the
train step takes and the rollout's metrics.

Stages (`rollout`), with what crosses between host and devices:

1. **Generate** (jit): G completions per prompt from the sampling policy (`sampler.generate`;
   the vision special tokens are never sampled), rows laid out `b*G + g`, sharded like the
   prompts, so each process holds the completions of its own prompts.
2. **Decode** (host): this process's rows of tokens, mask and entropy come to the host in one
   explicit transfer (`host.local_values`, no all-gather); text with special tokens skipped.
3. **Score** (host parse + jitted reward): `scoring.score` with the thresholds of the step
   (or a caller's `score_fn`), padding prompts' rows zeroed.
4. **Advantages** (jit): the rewards and row validity go to the devices in one explicit
   transfer (`host.global_rows`); one program computes the group advantages
   (`grpo.advantages`) and the scored-token mask, laid out like the rollout's rows.

The metrics are means over the real prompts' rows of every process (`host.gather_rows`: the
per-row terms, a few floats per row).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from visionr1_jax import fs, grpo, host, render, rewards, sampler, scoring, sharding
from visionr1_jax.step import UpdateBatch, model_inputs

ScoreFn = Callable[[Any, Sequence[str], int], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Rollout:
    """A rollout's result.

    Attributes:
      update: the `UpdateBatch` (device arrays; no old or reference log-probs yet).
      metrics: the rollout's metrics (reward terms, spreads, entropy, lengths, seconds).
      completions: this process's completions as text (row `i*G + g`: prompt i's g-th).
      terms: this process's per-row terms (`score_rows`), for renderings.
      tokens, mask, rewards: every row's tokens, mask and reward on the host when the
        rollout gathered them (for `rollouts.jsonl`), else None.
    """

    update: UpdateBatch
    metrics: dict[str, float]
    completions: list[str]
    terms: dict[str, np.ndarray]
    tokens: np.ndarray | None = None
    mask: np.ndarray | None = None
    rewards: np.ndarray | None = None


def score_rows(
    host_batch: Any, completions: Sequence[str], reward_config: ml_collections.ConfigDict,
    step: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """`scoring.score` of this process's completions against their prompts' targets, with
    `valid` (1 for a real prompt's rows) and `reward/total` 0 on padding rows (scored against
    the first target, then zeroed). host_batch: b prompt rows; completions: b·G texts."""
    g = len(completions) // len(host_batch.record_ids)
    valid = np.repeat(np.asarray(host_batch.arrays["valid"], bool), g)
    targets = host_batch.targets()
    if not targets:
        raise ValueError("a training batch has no valid rows")
    per_row, it = [], iter(targets)
    for ok in host_batch.arrays["valid"]:
        per_row.append(next(it) if ok else targets[0])
    terms = scoring.score(completions, [t for t in per_row for _ in range(g)], reward_config, step)
    terms["reward/total"] = np.where(valid, terms["reward/total"], 0.0).astype(np.float32)
    terms["valid"] = valid.astype(np.float32)
    return terms


def overlong_penalty(lengths: np.ndarray, max_len: int, cache: int) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of completions of `lengths`
    tokens (their stop token included) with the budget `max_len` (`grpo.max_new_tokens`) and
    the window `cache` (`reward.overlong`): 0 up to `max_len − cache` tokens, then falling
    linearly, `(max_len − cache − length) / cache`, to −1 at `max_len` (a completion cannot be
    longer). f32[R]; all 0 when `cache` is 0."""
    lengths = np.asarray(lengths, np.float64)
    if not cache:
        return np.zeros(lengths.shape, np.float32)
    start = max_len - cache
    return np.clip((start - lengths) / cache, -1.0, 0.0).astype(np.float32)


@functools.cache
def _advantages_program(g: int, estimator: str, rows: jax.sharding.Sharding) -> Callable:
    """Jitted `(scores f32[R, 3], mask bool[R, L]) -> (advantages f32[R], scored bool[R, L])`:
    column 0 the rewards, column 1 the rows' validity, column 2 whether the row's tokens get a
    loss (0: a truncated completion under `grpo.mask_truncated`); padding rows get advantage 0,
    and they and the masked rows no scored token."""

    def program(scores, mask):
        valid = scores[:, 1] > 0
        adv = grpo.advantages(scores[:, 0], g, estimator=estimator)
        return jnp.where(valid, adv, 0.0), mask & (valid & (scores[:, 2] > 0))[:, None]

    return jax.jit(program, out_shardings=(rows, rows))


_fold_in = jax.jit(jax.random.fold_in)  # the step's key on the devices: no implicit transfer


def _sample(policy, arrays, rng, step: int, c: ml_collections.ConfigDict):
    key = _fold_in(rng, jax.device_put(np.int32(step)))
    return sampler.generate(
        policy, arrays, rng=key, num_generations=int(c.num_generations),
        max_new_tokens=int(c.max_new_tokens), temperature=float(c.temperature),
        top_k=int(c.top_k), top_p=float(c.top_p),
    )  # fmt: skip


def rollout(
    policy: Any,
    device_batch: Any,
    *,
    rng: jax.Array,
    step: int,
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    eos_ids: Sequence[int],
    score_fn: ScoreFn,
    gather_tokens: bool = False,
) -> Rollout:
    """One rollout of `device_batch` (`pipeline.DeviceBatch`: global arrays and this
    process's `HostBatch`) from `policy` (module docstring). `score_fn(host_batch,
    completions, step)` gives the per-row terms (`score_rows` by default in the loop): at
    least `reward/total` and `valid`. `gather_tokens`: every row's tokens to the host too."""
    c = config.grpo
    g = int(c.num_generations)
    arrays, host_batch = device_batch.arrays, device_batch.host
    times = {}

    t0 = time.perf_counter()  # 1. generate; 2. this process's rows to the host
    out = _sample(policy, arrays, rng, step, c)
    tokens, mask, entropy = host.local_values((out.tokens, out.mask, out.entropy))
    rows = host.local_rows(out.tokens)
    times["time/rollout"] = time.perf_counter() - t0

    t0 = time.perf_counter()  # 2. decode, 3. score
    completions = scoring.decode(tokenizer, tokens, mask)
    terms = score_fn(host_batch, completions, step)
    terms["completion/truncated"] = scoring.truncated(tokens, mask, eos_ids).astype(np.float32)
    terms["completion/length"] = mask.sum(1).astype(np.float32)
    cache = int((config.get("reward") or {}).get("overlong", 0) or 0)
    if cache:  # DAPO's soft overlong penalty, added to the reward
        terms["reward/overlong"] = overlong_penalty(
            terms["completion/length"], int(c.max_new_tokens), cache
        )
        terms["reward/total"] = terms["reward/total"] + terms["reward/overlong"]
    loss_rows = np.ones_like(terms["completion/truncated"])
    if c.get("mask_truncated", False):  # truncated completions: no loss, still in the group
        loss_rows = 1.0 - terms["completion/truncated"]

    # 4. advantages: the scores to the devices once, one program
    n = out.tokens.shape[0]
    rows_sh = sharding.rows_sharding(out.tokens.sharding.mesh)
    scores = np.stack([terms["reward/total"], terms["valid"], loss_rows], axis=1)
    scores = scores.astype(np.float32)
    seqs = jax.device_put(out.tokens, rows_sh)
    program = _advantages_program(g, c.estimator, rows_sh)
    advantages, scored = program(
        host.global_rows(rows_sh, scores, n), jax.device_put(out.mask, rows_sh)
    )
    per_row = {k: v for k, v in terms.items() if k not in scoring.EVALUATION_ONLY}
    per_row |= {"mask": mask, "entropy": entropy}
    if gather_tokens:
        per_row["tokens"] = tokens
    every = host.gather_rows("visionr1_rollout", f"visionr1_rollout/{step}", rows, n, per_row)
    times["time/reward"] = time.perf_counter() - t0

    update = UpdateBatch(model_inputs(arrays), seqs, scored, advantages)
    stats = rollout_metrics(every, g)
    stats["throughput/rollout_tokens_per_s"] = stats["completion/tokens"] / times["time/rollout"]
    return Rollout(
        update=update,
        metrics=stats | times,
        completions=completions,
        terms=terms,
        tokens=every.get("tokens"),
        mask=every["mask"] if gather_tokens else None,
        rewards=every["reward/total"] if gather_tokens else None,
    )


def rollout_metrics(every: Mapping[str, np.ndarray], g: int) -> dict[str, float]:
    """Means over the real prompts' rows of every per-row term, the spread of the reward
    terms (`*_std`, over rows; `reward/group_std`, within groups), the share of groups whose
    G rewards are all equal (`reward/zero_std_groups`: no gradient), the token-mean entropy
    and the scored tokens. `every`: whole per-row arrays (`mask` bool[R, L], `entropy`
    f32[R, L], `valid`, the terms)."""
    every = dict(every)
    mask, entropy = every.pop("mask"), every.pop("entropy")
    every.pop("tokens", None)
    valid_rows = every.pop("valid") > 0
    total = every["reward/total"]
    group = total.reshape(-1, g)[valid_rows.reshape(-1, g)[:, 0]]  # real prompts' groups
    scored = mask[valid_rows]
    spread = {k: x for k, x in every.items() if k.startswith("reward/")}
    return {
        **{k: float(x[valid_rows].mean()) for k, x in every.items()},
        **{f"{k}_std": float(x[valid_rows].std()) for k, x in spread.items()},
        "reward/group_std": float(group.std(1, ddof=1).mean()) if g > 1 else 0.0,
        "reward/zero_std_groups": float((group.std(1) == 0).mean()),
        "entropy": float(entropy[valid_rows].sum() / max(scored.sum(), 1)),
        "completion/tokens": float(scored.sum()),
    }


def write_rollout(
    workdir: str, step: int, tokens: np.ndarray, mask: np.ndarray, rewards_: np.ndarray
) -> None:
    """Appends one rollout to `<workdir>/rollouts.jsonl` (process 0): the step, each row's
    generated token ids (masked tail dropped) and reward, all B·G rows in rollout order."""
    if jax.process_index() != 0:
        return
    row = {
        "step": int(step),
        "tokens": [t[m].tolist() for t, m in zip(tokens, mask, strict=True)],
        "rewards": [float(x) for x in rewards_],
    }
    # appended locally; a remote object is read, extended and rewritten (GCS has no append),
    # at once: the first `log_rollouts` rollouts are few, and each is durable when logged
    out = fs.Appender(fs.join(workdir, "rollouts.jsonl"))
    out.write(json.dumps(row) + "\n")
    out.close()


def render_rollout(
    config: ml_collections.ConfigDict, processor: Any, host_batch: Any,
    completions: Sequence[str], terms: Mapping[str, np.ndarray], step: int,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Images of this process's first `metrics.render_count` prompts, each with its
    best-rewarded completion: the image the model saw, the ground truth (green) and the
    predicted boxes (red, parsed as the reward parses them), captioned with the reward and the
    matched IoU. Returns {`rollout/<i>`: uint8[H, W, 3]} (empty off process 0)."""
    if jax.process_index() != 0:
        return {}
    rc = config.reward
    count = int(config.metrics.render_count)
    g = len(completions) // len(host_batch.record_ids)
    a = host_batch.arrays
    pixels = a["pixel_patches"] if "pixel_patches" in a else a["pixel_values"]  # u8 or f32
    images = render.images_from_pixel_values(pixels, a["image_grid_thw"], processor.image_processor)
    rows = np.nonzero(a["valid"])[0][:count]
    targets = dict(zip(np.nonzero(a["valid"])[0].tolist(), host_batch.targets(), strict=True))
    best = [int(i * g + np.argmax(terms["reward/total"][i * g : (i + 1) * g])) for i in rows]
    chosen = [completions[j] for j in best]
    parsed = rewards.parse.parse_batch(
        chosen, [targets[int(i)] for i in rows], frame=rc.frame, max_boxes=rc.max_boxes,
        max_coord=rc.max_coord,
    )  # fmt: skip
    out = {}
    for k, (i, j) in enumerate(zip(rows, best, strict=True)):
        target = targets[int(i)]
        names = {v: n for n, v in target.label_to_id.items()}
        keep = parsed.valid[k]
        labels = [names.get(int(x), "?") for x in parsed.labels[k][keep]]
        caption = f"step {step} | reward {terms['reward/total'][j]:.2f}"
        if "matched_iou" in terms:
            caption += f" | IoU {terms['matched_iou'][j]:.2f}"
        (image,) = render.render_examples(
            [images[int(i)]], [target], [(parsed.boxes[k][keep], labels)], [caption]
        )
        out[f"rollout/{k}"] = image
    return out
