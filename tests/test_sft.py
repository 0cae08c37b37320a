"""Supervised fine-tuning (issue #10, sft.py): targets, config, evaluation (through the one
evaluator, `evaluate.py`), and that it learns.

References are independent of `sft.py`: target strings are written out from the reference's
SFT collate (Vision-R1 `vision_r1/sft_qwen.py`: `[\\n\\t` + items joined by `,\\n\\t` +
`\\n]`, coordinates `int(x / W * w_in)` with the input size from `image_grid_thw · 14`, SPEC
§1) and tokenised directly with the tokenizer, or rendered with the chat template; evaluation
numbers are recomputed with `json`, a regex and scipy's Hungarian matcher.
"""

from __future__ import annotations

import json
import re

import jax
import ml_collections
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from visionr1_jax import (
    config_lib,
    evaluate,
    processing,
    rewards,
    sampler,
    scoring,
    sections,
    sft,
    sharding,
    train,
)
from visionr1_jax.data import data_config, eval_config, pipeline
from visionr1_jax.data.builders import synthetic_shapes
from visionr1_jax.models import testing
from visionr1_jax.sections.training import validate_sft

F32_U = testing.F32_U


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny", tokenizer="small")


@pytest.fixture(scope="module")
def processor(ckpt):
    return processing.load_processor(ckpt)


def _config(**data) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "sft"
    c.total_steps = 10
    c.model = sections.model_config()
    c.model.dtype = "float32"
    c.grpo = sections.grpo_config()
    c.optim = sections.optim_config()
    c.data = data_config()
    c.data.update(data)
    c.sft = sections.sft_config()
    return c


def _shapes(tmp_path_factory, name: str, **kw):
    """A small `synthetic_shapes` dataset built into a temporary data_dir (both splits)."""
    config = synthetic_shapes.ShapesConfig(name=name, **kw)
    data_dir = str(tmp_path_factory.mktemp(name))
    builder = synthetic_shapes.SyntheticShapes(config=config, data_dir=data_dir)
    builder.download_and_prepare()
    _shapes.data_dir = data_dir  # where the run opens it by name (the learning test)
    return builder.as_data_source()


def _host_batch(rows: list[dict], pad_rows: int = 0) -> pipeline.HostBatch:
    """A HostBatch from rows {boxes, labels, image_size, input_size}, plus padding rows."""
    b = len(rows) + pad_rows
    n = max(len(r["boxes"]) for r in rows)
    a = {
        "gt_boxes": np.zeros((b, n, 4), np.float32),
        "gt_mask": np.zeros((b, n), bool),
        "gt_classes": np.zeros((b, n), np.int32),
        "image_size": np.zeros((b, 2), np.int32),
        "input_size": np.zeros((b, 2), np.int32),
        "valid": np.zeros((b,), bool),
    }
    maps = []
    for i, r in enumerate(rows):
        k = len(r["boxes"])
        a["gt_boxes"][i, :k] = r["boxes"]
        a["gt_mask"][i, :k] = True
        a["image_size"][i] = r["image_size"]
        a["input_size"][i] = r["input_size"]
        a["valid"][i] = True
        maps.append({x: j + 1 for j, x in enumerate(dict.fromkeys(r["labels"]))})
    return pipeline.HostBatch(
        arrays=a,
        record_ids=tuple(str(i) for i in range(len(rows))) + ("",) * pad_rows,
        labels=tuple(tuple(r["labels"]) for r in rows) + ((),) * pad_rows,
        label_maps=tuple(maps) + ({},) * pad_rows,
        tasks=("detection",) * len(rows) + ("",) * pad_rows,
        prompts=("",) * b,
    )


def _reference_answer(boxes, labels, image_size, input_size) -> str:
    """The reference collate's answer string (qwen25_abs), written out independently."""
    (h, w), (h_in, w_in) = image_size, input_size
    turned = (
        np.asarray(boxes, np.float64) / np.array([w, h, w, h]) * np.array([w_in, h_in, w_in, h_in])
    )
    turned = turned.astype(int).tolist()
    strings = [
        f'{{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}], "label": "{c}"}}'
        for c, b in zip(labels, turned, strict=True)
    ]
    return "```json\n[\n\t" + ",\n\t".join(strings) + "\n]\n```"


# ----------------------------------------------------------------------------- targets

ROWS = [
    # 640x480 image resized to 644x476: x·644/640, y·476/480, truncated toward zero.
    dict(
        boxes=[[10, 20, 330, 470], [0.5, 1.5, 639.9, 479.9]],
        labels=["cat", "dog"],
        image_size=(480, 640),
        input_size=(476, 644),
    ),
    dict(
        boxes=[[3, 5, 50, 60]], labels=["traffic light"], image_size=(112, 112), input_size=(56, 56)
    ),
    dict(
        boxes=[[1, 2, 3, 4], [5, 6, 70, 80], [9, 10, 99, 111]],
        labels=["a", "b", "c"],
        image_size=(112, 100),
        input_size=(84, 84),
    ),
]


def test_answer_tokens_are_the_reference_answer_then_end_of_turn(processor):
    """Each valid row's target is the tokenised reference answer + <|im_end|>, ragged rows
    right-padded and masked, padding rows all False, L the power-of-two bucket."""
    tok = processor.tokenizer
    hb = _host_batch(ROWS, pad_rows=2)
    tokens, mask = sft.answer_tokens(hb, tok, _config())
    # Hand-computed row 0: 10·644/640 = 10.06, 20·476/480 = 19.83, 330·644/640 = 332.06,
    # 470·476/480 = 466.08; 0.5 -> 0, 1.5 -> 1.49 -> 1, 639.9 -> 643.9 -> 643, 479.9 -> 475.9.
    row0 = (
        '```json\n[\n\t{"bbox_2d": [10, 19, 332, 466], "label": "cat"},\n\t'
        '{"bbox_2d": [0, 1, 643, 475], "label": "dog"}\n]\n```'
    )
    assert _reference_answer(**ROWS[0]) == row0
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    want = [[*tok.encode(_reference_answer(**r), add_special_tokens=False), eot] for r in ROWS]
    longest = max(len(w) for w in want)
    length = tokens.shape[1]
    assert length == max(16, 1 << (longest - 1).bit_length()) and length >= longest
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (5, length)
    assert len({len(w) for w in want}) == 3  # ragged
    for i, w in enumerate(want):
        assert tokens[i, : len(w)].tolist() == w
        assert mask[i].tolist() == [True] * len(w) + [False] * (length - len(w))
    assert not mask[3:].any()


def test_answer_tokens_cut_at_max_len_and_empty_batch(processor):
    tok = processor.tokenizer
    hb = _host_batch(ROWS[:1])
    full = tok.encode(_reference_answer(**ROWS[0]), add_special_tokens=False)
    tokens, mask = sft.answer_tokens(hb, tok, _config(), max_len=20)
    assert tokens.shape == (1, 20) and mask.all()
    assert tokens[0].tolist() == full[:20]  # cut: no <|im_end|>
    c = _config()
    c.sft.max_answer_len = 16
    assert sft.answer_tokens(hb, tok, c)[0].shape == (1, 16)
    empty = _host_batch(ROWS[:1], pad_rows=3)
    empty.arrays["valid"][0] = False
    tokens, mask = sft.answer_tokens(empty, tok, c)
    assert tokens.shape == (4, 16) and not mask.any()


@pytest.mark.parametrize("frame", ["rel1000", "norm01"])
def test_answer_text_other_frames(frame):
    """rel1000: round(x / W · 1000); norm01: round(x / W, 3) (SPEC §1), in the same layout."""
    boxes = np.array([[10.0, 20.0, 330.0, 470.0]])
    got = json.loads(sft.answer_text(boxes, ["cat"], frame, (480, 640), (476, 644))[8:-4])
    scale = np.array([640, 480, 640, 480], np.float64)
    want = (
        np.round(boxes[0] / scale * 1000) if frame == "rel1000" else np.round(boxes[0] / scale, 3)
    )
    assert got == [{"bbox_2d": want.tolist(), "label": "cat"}]


def test_pipeline_targets_continue_the_chat_prompt(tmp_path_factory, processor):
    """On pipeline batches (3 shapes at most, 112 px images resized to 56 px), prompt tokens
    + target tokens are exactly the chat template's rendering of the conversation with the
    reference answer as the assistant turn (image pads expanded), up to its <|im_end|>; the
    input size is `image_grid_thw · 14`."""
    src = _shapes(tmp_path_factory, "sft_ragged", num_train=16, num_validation=4, max_shapes=3)
    c = _config(batch_size=8, max_pixels=56 * 56, max_prompt_len=160, num_epochs=1,
                shuffle=False, num_threads=0, prefetch=0, max_instances=3)  # fmt: skip
    hb = next(pipeline.InputPipeline(c.data, processor, source=src["train"]))
    tokens, mask = sft.answer_tokens(hb, processor.tokenizer, c)
    tok = processor.tokenizer
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    a = hb.arrays
    counts = a["gt_mask"].sum(1)
    assert a["valid"].all() and len(set(counts.tolist())) > 1  # ragged answers
    for i in range(len(counts)):
        grid = a["image_grid_thw"][i]
        input_size = (int(grid[1]) * 14, int(grid[2]) * 14)
        assert input_size == (56, 56)
        answer = _reference_answer(
            a["gt_boxes"][i, : counts[i]], hb.labels[i], tuple(a["image_size"][i]), input_size
        )
        user = [{"type": "image"}, {"type": "text", "text": hb.prompts[i]}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        at = ids.index(pad_id)
        n_img = int(np.prod(grid)) // 4
        ids = ids[:at] + [pad_id] * n_img + ids[at + 1 :]
        prompt = a["input_ids"][i][a["attention_mask"][i] == 1].tolist()
        target = tokens[i][mask[i]].tolist()
        assert prompt + target == ids[: len(prompt) + len(target)]
        assert target[-1] == tok.convert_tokens_to_ids("<|im_end|>")


# ----------------------------------------------------------------------------- config


# SFT's evaluation settings are the one evaluator's `eval` section now: the old `sft.eval_*`
# keys are rejected naming the key that replaced them, and the `eval` section's own checks
# reject the values the old keys' checks rejected.
@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("sft", "max_answer_len", 0, "sft.max_answer_len=0 must be an int >= 1"),
        ("sft", "max_answer_len", 1.5, "sft.max_answer_len=1.5"),
        ("eval", "every", -1, "eval.every=-1"),
        ("eval", "max_new_tokens", 0, "eval.max_new_tokens=0"),
        ("sft", "eval_batches", 4, "sft.eval_batches=4 was replaced by eval.batches"),
        (
            "sft",
            "eval_max_new_tokens",
            64,
            "sft.eval_max_new_tokens=64 was replaced by eval.max_new_tokens",
        ),
        ("sft", "max_answr_len", 64, "sft.max_answr_len=64 is not a key of the sft section"),
    ],
)
def test_validation_rejects(section, key, value, match):
    c = _config()
    c.eval = sections.eval_config()
    with c[section].ignore_type():
        c[section][key] = value
    with pytest.raises(ValueError, match=re.escape(match)):
        config_lib.validate(c)


def test_validation_rejects_the_old_eval_every_naming_eval_every():
    """`sft.eval_every` (SFT's own evaluator, gone) is rejected by `config_lib.validate` with
    a message naming `eval.every`, the one evaluator's key that replaced it; the sft section's
    own validator says the same."""
    c = _config()
    with c.sft.ignore_type():
        c.sft.eval_every = 100
    want = "sft.eval_every=100 was replaced by eval.every; set that instead"
    with pytest.raises(ValueError, match=re.escape(want)):
        config_lib.validate(c)
    with pytest.raises(ValueError, match=re.escape(want)):
        validate_sft(c)


def test_validation_accepts_and_rejects_by_objective():
    c = _config()
    c.sft.max_answer_len = 64
    c.eval = sections.eval_config()  # SFT's held-out evaluation: the `eval` section
    c.eval.every = 100
    c.eval.batches = 2
    c.eval.max_new_tokens = 64
    assert config_lib.validate(c) is c
    c.objective = "grpo"
    with pytest.raises(ValueError, match="has no effect with objective='grpo'"):
        config_lib.validate(c)
    c.sft = sections.sft_config()  # the defaults are harmless
    config_lib.validate(c)


# ----------------------------------------------------------------------------- evaluation

_INT = r"(\d{1,3}|1000)"
_ITEM = re.compile(r"\{\"bbox_2d\": \[" + ", ".join([_INT] * 4) + r"\], \"label\": \"([^\"]+)\"\}")


def _oracle_parse(text: str) -> tuple[bool, list[tuple[list[int], str]]]:
    """SPEC §2's official rules (qwen25_abs): (format ok, [(box, label)])."""
    s = text.strip()
    lines = s.split("\n")
    if lines[0].startswith("```json"):
        s = "\n".join(lines[1:])
    s = s.split("```")[0]
    try:
        data = json.loads(s)
    except ValueError:
        data = None
    fmt = data is not None and (
        not isinstance(data, list)
        or all(
            isinstance(d["bbox_2d"], list) and len(d["bbox_2d"]) == 4
            for d in data
            if isinstance(d, dict) and "bbox_2d" in d and "label" in d
        )
    )
    items = []
    if isinstance(data, list):
        for d in data:
            try:
                box = [int(v) for v in d["bbox_2d"]]
                if len(box) == 4 and box[0] < box[2] and box[1] < box[3]:
                    items.append((box, d["label"]))
            except (KeyError, TypeError, ValueError):
                pass
    if not items:
        for m in _ITEM.finditer(text):
            box = [int(v) for v in m.groups()[:4]]
            if box[0] < box[2] and box[1] < box[3]:
                items.append((box, m.group(5)))
    return bool(fmt), items


def _iou_giou(p: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
    ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    hull = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
    return inter / union, inter / union - (hull - union) / hull


def _oracle_scores(completions, targets) -> dict[str, float]:
    """parse rate and mean IoU over Hungarian pairs of cost L1 − 1[class] − GIoU (SPEC §3)."""
    parsed, ious = [], []
    for text, t in zip(completions, targets, strict=True):
        fmt, items = _oracle_parse(text)
        parsed.append(fmt and len(items) > 0)
        if not items or not len(t.boxes):
            continue
        (h, w), (h_in, w_in) = t.image_size, t.input_size
        scale = np.array([w / w_in, h / h_in, w / w_in, h / h_in])
        pred = [np.array(b, np.float64) * scale for b, _ in items]
        cls = [t.label_to_id.get(str(lab).strip().lower(), 0) for _, lab in items]
        gt_cls = t.label_ids
        cost = np.zeros((len(pred), len(t.boxes)))
        for i, p in enumerate(pred):
            for j, g in enumerate(t.boxes):
                cost[i, j] = np.abs(p - g).sum() - (cls[i] == gt_cls[j]) - _iou_giou(p, g)[1]
        rows, cols = linear_sum_assignment(cost)
        ious += [_iou_giou(pred[i], t.boxes[j])[0] for i, j in zip(rows, cols, strict=True)]
    return {
        "parse_rate": float(np.mean(parsed)),
        "matched_iou": float(np.mean(ious)) if ious else 0.0,
        "num_matched": float(len(ious)),
    }


# IoU of float32-exact boxes (integer pixels, power-of-two scale) in float32: about ten
# roundings of values <= the union (relative u each), the pair mean and its re-weighting a few
# more; 32 u bounds the absolute error of a mean of values <= 1.
IOU_ATOL = 32 * F32_U


def test_score_completions_match_an_independent_parser_and_hungarian():
    """Hand-written answers (valid, reordered boxes, an inverted box, a wrong label, truncated
    JSON read by the regex fallback, garbage, an empty list) score as the oracle says."""
    gt = dict(boxes=[[10, 20, 50, 60], [60, 10, 100, 40]], labels=["cat", "dog"],
              image_size=(112, 112), input_size=(56, 56))  # fmt: skip
    target = rewards.Target(**gt, label_to_id={"cat": 1, "dog": 2})
    completions = [
        '```json\n[\n\t{"bbox_2d": [5, 10, 25, 30], "label": "cat"},\n\t'
        '{"bbox_2d": [30, 5, 50, 20], "label": "dog"}\n]\n```',
        '```json\n[{"bbox_2d": [31, 4, 49, 21], "label": "dog"}, '
        '{"bbox_2d": [6, 11, 24, 31], "label": "cat"}]\n```',
        '```json\n[{"bbox_2d": [25, 30, 5, 10], "label": "cat"}]\n```',
        '```json\n[{"bbox_2d": [4, 9, 26, 33], "label": "bird"}]\n```',
        '```json\n[{"bbox_2d": [7, 12, 22, 28], "label": "cat"}, {"bbox_2d": [3',
        "no boxes here",
        "```json\n[]\n```",
    ]
    targets = [target] * len(completions)
    config = _config(max_pixels=56 * 56)
    got = scoring.score(completions, targets, scoring.reward_config(config))
    want = _oracle_scores(completions, targets)
    parsed = (got["parse_rate"] == 1.0) & (got["boxes/parsed"] >= 1)
    assert parsed.tolist() == [True, True, False, True, False, False, False]
    assert float(parsed.mean()) == want["parse_rate"]
    pairs = got["boxes/matched"].sum()
    assert pairs == want["num_matched"] == 6
    iou = float((got["matched_iou"].astype(np.float64) * got["boxes/matched"]).sum() / pairs)
    assert abs(iou - want["matched_iou"]) <= IOU_ATOL
    # ...and the evaluator's metrics of the same answers (`compute_metrics`, the one path)
    answers = [
        evaluate.Answer(str(k), text, target, np.zeros((0, 4), np.float32), [],
                        np.zeros((0,), np.float32), False)
        for k, text in enumerate(completions)
    ]  # fmt: skip
    metrics = evaluate.compute_metrics(answers, config)
    assert metrics["parse_rate"] == want["parse_rate"]
    assert metrics["num_matched"] == want["num_matched"]
    assert abs(metrics["matched_iou"] - want["matched_iou"]) <= IOU_ATOL


def test_sft_update_shards_targets_as_the_batch(processor):
    """`sft_update`'s targets become global arrays laid out as the batch's rows (the rows
    sharding of the batch's mesh), holding `answer_tokens` of the host batch."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec("data", None)
    ids = jax.device_put(np.zeros((8, 5), np.int32), jax.sharding.NamedSharding(mesh, spec))
    hb = _host_batch(ROWS, pad_rows=5)
    c = _config()
    update, extra = sft.sft_update(hb, {"input_ids": ids}, processor.tokenizer, c, step=0)
    tokens, mask = sft.answer_tokens(hb, processor.tokenizer, c)
    rows = sharding.rows_sharding(mesh)
    for out, local in ((update.tokens, tokens), (update.mask, mask)):
        assert out.sharding == rows and out.shape == local.shape
        assert out.sharding.is_equivalent_to(ids.sharding, 2)  # laid out as the batch's rows
        np.testing.assert_array_equal(np.asarray(out), local)
    assert list(update.prompts) == ["input_ids"] and update.prompts["input_ids"] is ids
    assert update.advantages is None
    assert extra == {"sft/answer_len": float(tokens.shape[1]), "sft/truncated": 0.0}


# ----------------------------------------------------------------------------- learning

LEARN_STEPS, LEARN_BATCH, LEARN_LR = 200, 16, 1e-2
MAX_NEW_TOKENS = 48  # a one-box answer is ~42 tokens with <|im_end|>


def test_sft_raises_parse_rate_and_matched_iou_on_held_out_images(tmp_path_factory, ckpt):
    """The tiny model (random weights) trained by SFT on `synthetic_shapes` (one shape per
    112 px image, answers in the 56 px model-input frame): on 32 held-out validation images its
    greedy answers go from never parsing to parsing, and the matched IoU from 0 (no pair) to
    clearly positive. The one evaluator (`evaluate.evaluate`, reading the validation split
    through the pipeline) gives greedy answers equal to the sampler's own greedy decoding of
    the held-out batches, and its numbers equal an independent parser + scipy Hungarian on
    those answers.

    Seeds 0, 1, 2 (checkpoint and data order) after 200 steps: parse rate 0 -> 1.0 each,
    matched IoU 0 -> 0.19 / 0.16 / 0.24 (150-180 s each on 2 heavily shared cores; 120 s of
    CPU). In this budget the model learns the answer format and a data-prior box (the IoU is
    that of its most common answer given to every image), not yet image-specific boxes.
    """
    src = _shapes(tmp_path_factory, "sft_learn", num_train=1024, num_validation=32,
                  max_shapes=1, min_scale=0.3, texture=False)  # fmt: skip
    c = _config(batch_size=LEARN_BATCH, max_pixels=56 * 56, max_prompt_len=128,
                max_instances=1, pixels="float32")  # fmt: skip
    c.total_steps = LEARN_STEPS
    c.optim.learning_rate = LEARN_LR
    c.optim.warmup_steps = 10
    # Trained by the run's own loop (`train.setup` + `train.train_loop`, objective sft): the
    # same state, step factory, mesh and device-prefetched pipeline as GRPO.
    c.seed = 0
    c.progress = False
    c.model.checkpoint = ckpt
    c.data.builder_config = "sft_learn"
    c.data.data_dir = _shapes.data_dir
    c.mesh = sections.mesh_config(ici=(1, 1, 1))
    c.eval = sections.eval_config()  # the evaluator's budget; no evaluation in the loop
    c.eval.max_new_tokens = MAX_NEW_TOKENS
    processor = processing.load_processor(ckpt)
    tok = processor.tokenizer
    held_out = list(
        pipeline.InputPipeline(eval_config(c.data), processor, source=src["validation"])
    )
    job = train.setup(c, str(tmp_path_factory.mktemp("sft_run")))
    before, _ = evaluate.evaluate(job.policy, processor, c, job.mesh)
    rows = train.train_loop(job)
    losses = [m["loss"] for m in rows]
    assert [m["step"] for m in rows] == list(range(LEARN_STEPS))
    model = job.policy
    after, answers = evaluate.evaluate(model, processor, c, job.mesh)

    # The same greedy answers (decoded here from the held-out batches) scored by the oracle.
    completions, targets = [], []
    for hb in held_out:
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
        out = sampler.generate(model, {k: hb.arrays[k] for k in keys}, rng=jax.random.key(0),
                               max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                               cache_dtype=np.float32)  # fmt: skip
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        for i in np.nonzero(hb.arrays["valid"])[0]:
            completions.append(tok.decode(tokens[i][mask[i]], skip_special_tokens=True))
        targets += hb.targets()
    assert [a.completion for a in answers] == completions
    ids = [hb.record_ids[i] for hb in held_out for i in np.nonzero(hb.arrays["valid"])[0]]
    assert [a.record_id for a in answers] == ids
    oracle = _oracle_scores(completions, targets)
    assert after["num_examples"] == len(completions) == 32
    assert after["parse_rate"] == oracle["parse_rate"]
    assert after["num_matched"] == oracle["num_matched"]
    assert abs(after["matched_iou"] - oracle["matched_iou"]) <= IOU_ATOL

    print(f"SFT losses {losses[0]:.2f} -> {losses[-1]:.2f}; before {before}; after {after}")
    assert losses[-1] < 0.2 * losses[0]
    # Seed noise: every seed ends at parse rate 1.0 and matched IoU >= 0.15 (docstring); the
    # untrained model never parses (0 pairs, IoU 0).
    assert before["parse_rate"] <= 0.1 and after["parse_rate"] >= 0.9
    assert before["matched_iou"] <= 0.02 and after["matched_iou"] >= before["matched_iou"] + 0.1
