"""The RL loop (issue #10): `train.run` / `train_loop` / `grpo_iteration` on the tiny model.

- a short run writes one metrics line per optimizer step (μ of them per rollout), compiles the
  sampler and the train step once, and records rollouts;
- completions are decoded with special tokens skipped (a trailing `<|im_end|>` would fail the
  official format check) and truncated completions are counted (oracles written by hand);
- learning is real (acceptance 2): GRPO from random init with a simple verifiable reward (the
  share of digits in the decoded completion) raises the mean reward of the last steps clearly
  above the first ones, seeded.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from visionr1_jax import (
    host,
    metrics,
    processing,
    rewards,
    rollout,
    sampler,
    scoring,
    sections,
    train,
)
from visionr1_jax.data import data_config
from visionr1_jax.data.builders import synthetic_shapes
from visionr1_jax.models import testing, tiny

MAX_PIXELS = 112 * 112


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("loop_ckpt") / "tiny")
    return tiny.write_tiny_checkpoint(
        path, "qwen2_5_vl_tiny", tokenizer="small", min_pixels=3136, max_pixels=MAX_PIXELS
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    config = synthetic_shapes.ShapesConfig(name="loop", num_train=64, num_validation=8)
    d = str(tmp_path_factory.mktemp("loop_data"))
    synthetic_shapes.SyntheticShapes(config=config, data_dir=d).download_and_prepare()
    return d


def loop_config(ckpt: str, data_dir: str, **grpo) -> object:
    import ml_collections

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.objective = "grpo"
    c.total_steps = 4
    c.progress = False
    c.log_rollouts = 2
    c.model = sections.model_config()
    c.model.checkpoint = ckpt
    c.model.dtype = "float32"
    c.data = data_config()
    c.data.builder_config = "loop"
    c.data.data_dir = data_dir
    c.data.batch_size = 2
    c.data.max_pixels = MAX_PIXELS
    c.data.max_prompt_len = 160
    c.data.num_threads = 0
    c.data.prefetch = 0
    c.reward = rewards.default_config("official")
    c.grpo = sections.grpo_config()
    c.grpo.num_generations = 2
    c.grpo.max_new_tokens = 8
    c.grpo.update(grpo)
    c.optim = sections.optim_config()
    c.optim.learning_rate = 1e-4
    c.mesh = sections.mesh_config(ici=(1, 1, 1))
    return c


def test_decode_skips_special_tokens_and_official_format_passes(ckpt):
    tok = processing.load_processor(ckpt).tokenizer
    answer = '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "circle"}]\n```'
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    row = [*ids, im_end]
    tokens = np.full((2, len(row) + 3), pad, np.int64)
    mask = np.zeros(tokens.shape, bool)
    tokens[0, : len(row)], mask[0, : len(row)] = row, True
    tokens[1, : len(ids)], mask[1, : len(ids)] = ids, True
    texts = scoring.decode(tok, tokens, mask)
    assert texts == [answer, answer]
    target = rewards.Target([[1, 2, 30, 40]], ["circle"], (112, 112), (112, 112))
    parsed = rewards.parse.parse_answer(texts[0], frame="qwen25_abs", input_size=(112, 112))
    assert parsed.format_official == 1.0
    # Without skipping, the official check (json.loads of the fenced text) would fail:
    raw = tok.decode(row)
    assert raw.endswith("<|im_end|>")
    assert rewards.score([raw], [target])["format"][0] == 0.0


def test_truncated_counts_rows_cut_at_the_budget():
    eos = (7, 9)
    tokens = np.array([[1, 2, 7, 0], [1, 2, 3, 4], [5, 9, 0, 0], [0, 0, 0, 0], [3, 3, 3, 9]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    # row 0 stopped on 7, row 1 ran out of budget, row 2 stopped on 9, row 3 is empty (cut at
    # 0 tokens), row 4 stopped on its last allowed token.
    expected = [False, True, False, True, False]
    assert scoring.truncated(tokens, mask, eos).tolist() == expected


def logit_bound(params) -> float:
    """An upper bound on the policy's |logits| for any input: the final RMSNorm's output y has
    ||y|| <= sqrt(D) max|g|, so |W_i . y| <= ||W_i|| sqrt(D) max|g| (Cauchy-Schwarz)."""
    w = np.asarray(params["lm_head"]["kernel"][...])  # [D, V]
    g = np.asarray(params["model"]["norm"]["weight"][...])
    return float(np.sqrt(w.shape[0]) * np.abs(g).max() * np.linalg.norm(w, axis=0).max())


def _digit_share(reward_config, host_batch, completions, step):
    """A simple verifiable reward: the share of decimal digits among non-space characters.
    The Vision-R1 terms of the same completions are kept as metrics (`score_rows`)."""
    terms = rollout.score_rows(host_batch, completions, reward_config, step)
    share = []
    for text in completions:
        chars = [ch for ch in text if not ch.isspace()]
        share.append(sum(ch.isdigit() for ch in chars) / max(len(chars), 1))
    terms["reward/total"] = np.asarray(share, np.float32) * terms["valid"]
    return terms


def test_grpo_loop_learns_a_verifiable_reward_from_random_init(ckpt, data_dir, tmp_path):
    """Acceptance 2, seeded, from the random tiny checkpoint: 4 prompts × G 8, β = 0, μ = 2
    updates per rollout, 24 optimizer steps. The same run checks the loop's bookkeeping:
    one metrics line per optimizer step, one sampler and one train-step program, the ratio ≡ 1
    at each rollout's first update (the old log-probs are the policy's own, once per rollout),
    the first rollouts recorded."""
    c = loop_config(ckpt, data_dir, num_generations=8, max_new_tokens=12, beta=0.0)
    c.grpo.num_iterations = 2
    c.grpo.epsilon_high = 0.28
    c.data.batch_size = 4
    c.total_steps = 24
    c.optim.learning_rate = 3e-3
    before = sampler.compile_count()
    compiled = host.compile_counts().get("jit(train_step)", 0)
    job = train.setup(c, str(tmp_path))
    bounds = {}  # rollout step -> bound on the policy's |logits| when it sampled

    def score(host_batch, completions, step):
        bounds[step] = logit_bound(job.state.params)
        return _digit_share(job.config.reward, host_batch, completions, step)

    job.programs.score_fn = score
    rows = train.train_loop(job)

    reward = np.array([m["reward/total"] for m in rows])
    first, last = reward[:6].mean(), reward[-6:].mean()
    print("digit share per step:", np.round(reward[::2], 3).tolist())
    # Seed noise of a 6-step mean of 32 completions is ~0.02 at these rates (measured spread
    # of the first steps); the margin asks for several times that.
    assert last > first + 0.15, (first, last)

    assert [m["step"] for m in rows] == list(range(24)) and int(job.state.step) == 24
    assert sampler.compile_count() - before == 1
    assert job.programs.train_step._cache_size() == 1
    # compiled once, at start-up (memory_analysis), and that executable served every call
    assert host.compile_counts()["jit(train_step)"] - compiled == 1
    assert job.programs.memory["temp"] > 0  # memory_analysis was logged at start-up
    written = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [m["step"] for m in written] == list(range(24))
    for key in ("reward/total", "reward/format", "reward/recall", "reward/precision", "loss",
                "time/rollout", "time/reward", "time/update", "time/step", "time/data",
                "completion/length", "completion/truncated", "parse_rate", "reward/group_std",
                "data/skipped_total", "clip_frac", "ratio_mean"):  # fmt: skip
        assert key in written[0], key
    # The old log-probs are a separate jit of the same float32 computation as the step's own:
    # the ratio is exp(Δ), |Δ| within the float32 log-prob tolerance at the policy's logit scale.
    vocab = job.policy.cfg.vocab_size
    atol = {
        k: np.expm1(testing.logprob_atol(b / c.grpo.temperature, vocab)) for k, b in bounds.items()
    }
    assert sorted(atol) == list(range(0, 24, 2))
    for m in written[::2]:
        assert abs(m["ratio_min"] - 1) <= atol[m["step"]], (m["step"], m["ratio_min"])
        assert abs(m["ratio_max"] - 1) <= atol[m["step"]], (m["step"], m["ratio_max"])
    moved = max(m["ratio_max"] - 1 for m in written[1::2])
    print("first-update ratio tolerance", max(atol.values()), "second updates move", moved)
    assert moved > 3 * max(atol.values()), moved  # second updates move well past rounding
    logged = [json.loads(x) for x in open(tmp_path / "rollouts.jsonl")]
    assert [x["step"] for x in logged] == [0, 2]  # log_rollouts = 2 rollouts, μ = 2
    assert len(logged[0]["tokens"]) == 32 and len(logged[0]["rewards"]) == 32
    assert all(1 <= len(t) <= 12 for t in logged[0]["tokens"])
    np.testing.assert_allclose(np.mean(logged[0]["rewards"]), reward[0], rtol=1e-6)


# ------------------------------------------------------------------------------ telemetry

# Every key the GRPO loop writes each step with β > 0 (issue 11: detection telemetry).
TELEMETRY = (
    "reward/total", "reward/format", "reward/recall", "reward/precision",
    "reward/total_std", "reward/format_std", "reward/recall_std", "reward/precision_std",
    "reward/group_std", "reward/zero_std_groups",
    "matched_iou", "matched_giou", "boxes/pred", "boxes/gt", "boxes/matched",
    "parse_rate", "parse_failure", "completion/truncated", "completion/length",
    "completion/tokens", "entropy",
    "threshold/recall_tp", "threshold/recall_lo", "threshold/recall_hi",
    "threshold/precision_lo", "threshold/precision_hi",
    "loss", "kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "grad_norm",
    "learning_rate", "bad_step", "bad_steps_total",
    "time/data", "time/rollout", "time/reward", "time/reference", "time/update", "time/step",
    "throughput/tokens_per_s", "throughput/rollout_tokens_per_s", "compiles",
    "data/skipped_total", "data/selected_out_total",
)  # fmt: skip


def read_events(logdir) -> tuple[dict, dict]:
    """TensorBoard event files read back without TensorBoard: TFRecord frames (u64 length,
    u32 crc, payload, u32 crc) of `Event` protos. Returns ({tag: {step: value}},
    {tag: {step: png bytes}})."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    scalars, images = {}, {}
    files = sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*")))
    assert files, logdir
    for name in files:
        data = open(name, "rb").read()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
            at += 16 + n
            for v in event.summary.value:
                if v.HasField("image"):
                    images.setdefault(v.tag, {})[event.step] = v.image.encoded_image_string
                else:
                    scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars, images


def test_telemetry_in_metrics_jsonl_tensorboard_and_renderings(ckpt, data_dir, tmp_path):
    """A 4-step run with β > 0 writes every telemetry key each step to metrics.jsonl and the
    same values to TensorBoard (read back from the event files), and renders completions
    over their images every `metrics.render_every` steps (PNG files and TensorBoard images)."""
    import io

    from PIL import Image

    c = loop_config(ckpt, data_dir, beta=0.04)
    c.metrics = sections.metrics_config()
    c.metrics.render_every = 2
    c.metrics.render_count = 2
    c.eval = sections.eval_config()  # greedy evaluation after steps 2 and 4 (the last)
    c.eval.every = 2
    c.eval.max_new_tokens = 8
    c.eval.score = "logprob"
    train.run(c, str(tmp_path))

    written = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [m["step"] for m in written] == [0, 1, 2, 3]
    stages = [dict(x) for x in c.reward.stages]
    for m in written:
        missing = [k for k in TELEMETRY if k not in m]
        assert not missing, (m["step"], missing)
        for k in TELEMETRY:
            assert isinstance(m[k], int | float) and np.isfinite(m[k]), (m["step"], k, m[k])
        assert 0 <= m["matched_iou"] <= 1 and -1 <= m["matched_giou"] <= m["matched_iou"]
        assert m["boxes/gt"] >= 1 and m["boxes/matched"] <= min(m["boxes/pred"], m["boxes/gt"])
        assert m["entropy"] > 0 and m["time/reference"] > 0 and m["kl"] >= 0
        assert m["compiles"] >= 3  # at least the sampler, the reward and the train step
        # the thresholds in force: the last stage started at or before the step
        stage = max((x for x in stages if x["start_step"] <= m["step"]),
                    key=lambda x: x["start_step"])  # fmt: skip
        for k in ("recall_tp", "recall_lo", "recall_hi", "precision_lo", "precision_hi"):
            assert m[f"threshold/{k}"] == float(np.float32(stage[k])), k
        length = m["completion/tokens"] / (c.data.batch_size * c.grpo.num_generations)
        assert abs(m["completion/length"] - length) <= 1e-6 * length  # one mean, two ways

    # the evaluations: in the metrics rows of optimizer steps 1 and 3 (after 2 and 4 updates)
    # and in eval/step_2.json, eval/step_4.json
    for m in written:
        evaluated = m["step"] in (1, 3)
        assert ("eval/AP" in m) == evaluated and ("time/eval" in m) == evaluated, m["step"]
        if evaluated:
            record = json.loads((tmp_path / "eval" / f"step_{m['step'] + 1}.json").read_text())
            assert record["step"] == m["step"] + 1
            assert {f"eval/{k}": v for k, v in record["metrics"].items()} == {
                k: v for k, v in m.items() if k.startswith("eval/")
            }
            assert record["metrics"]["num_examples"] == 8  # the fixture's validation split

    scalars, images = read_events(tmp_path / "tensorboard")
    for m in written:
        for k, v in m.items():
            if k == "step" or v is None:
                continue
            # TensorBoard stores float32: equal to the JSON value rounded to float32.
            assert scalars[k][m["step"]] == np.float32(v), (k, m["step"])
    assert sorted(images) == ["rollout/0", "rollout/1"]
    for tag, by_step in images.items():
        assert sorted(by_step) == [0, 2], tag
        png = np.asarray(Image.open(io.BytesIO(by_step[0])).convert("RGB"))
        disk = np.asarray(
            Image.open(tmp_path / "renderings" / "step_0" / f"{tag.replace('/', '_')}.png")
        )
        np.testing.assert_array_equal(png, disk)
        assert min(png.shape[:2]) >= 256
        # the ground-truth boxes (every training prompt has at least one) are drawn in green
        green = (png[..., 1] > 200) & (png[..., 0] < 60) & (png[..., 2] < 60)
        assert green.sum() > 50, tag
