"""The evaluation run (issue 12): greedy answers of the model on the evaluation split, parsed
as the reward parses them, scored (constant 0.99 or the model's own coordinate-token
probabilities) and evaluated by protocol; the command line's JSON, TensorBoard and table.

- `box_scores` against the tokenizer's own character offsets (an independent mapping from
  tokens to text), with a dropped item and a non-ASCII label before a box;
- `compute_metrics` per protocol against `detection_metrics` / `odinw_average` /
  hand-counted Acc@0.5 and parse rates;
- `python -m visionr1_jax.evaluate` on the tiny model: the answers are the sampler's greedy
  answers decoded independently, and the files it writes hold the metrics of its answers.
"""

from __future__ import annotations

import json
import os

import conftest
import jax
import ml_collections
import numpy as np
import pytest

from visionr1_jax import config_lib, eval_metrics, evaluate, processing, sampler, sections
from visionr1_jax.data import config as data_config_lib
from visionr1_jax.data import pipeline
from visionr1_jax.data.builders import synthetic_shapes
from visionr1_jax.models import testing, tiny
from visionr1_jax.rewards import parse
from visionr1_jax.rewards.parse import Target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ box scores

ANSWER = (
    "```json\n[\n"
    '\t{"bbox_2d": [12, 5, 40, 33], "label": "café"},\n'
    '\t{"bbox_2d": [1, 2, 3], "label": "dropped"},\n'
    '\t{"bbox_2d": [50, 60, 70, 80], "label": "dog"}\n'
    "]\n```"
)


@pytest.mark.parametrize("kind", ["small", "qwen"])
def test_box_scores_average_the_coordinate_tokens(kind):
    tok = tiny.small_tokenizer() if kind == "small" else _qwen_tokenizer()
    enc = tok(ANSWER, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert tok.decode(ids) == ANSWER
    logps = -np.random.default_rng(0).uniform(0.0, 3.0, len(ids)).astype(np.float32)
    parsed = parse.parse_answer(ANSWER, input_size=(100, 100))
    assert parsed.boxes == [[12, 5, 40, 33], [50, 60, 70, 80]]  # the 3-value item dropped

    got = evaluate.box_scores(tok, ids, logps, parsed.boxes)

    # Oracle: the tokens whose character span overlaps the box's "a, b, c, d".
    want = []
    for box in parsed.boxes:
        inner = ", ".join(str(int(v)) for v in box)
        a = ANSWER.index(f"[{inner}]") + 1
        b = a + len(inner)
        hit = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
        want.append(np.exp(np.mean(logps[hit].astype(np.float64))))
    # f32 logps of magnitude <= 3: the mean and exp agree to a few f32 ulps.
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32 and np.all((got > 0) & (got <= 1))
    # A box the answer does not write as a list (another spacing) gets the answer's mean.
    other = evaluate.box_scores(tok, ids, logps, [[1, 1, 2, 2]])
    np.testing.assert_allclose(other, [np.exp(np.mean(logps.astype(np.float64)))], rtol=1e-6)


def _qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.qwen_tokenizer_dir())


# ---------------------------------------------------------------------- metrics by protocol


def _answer(rid, text, target, boxes, labels, truncated=False):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.full(len(labels), eval_metrics.PAPER_SCORE, np.float32)
    return evaluate.Answer(rid, text, target, boxes, list(labels), scores, truncated)


def _config(name="synthetic_shapes", **eval_over):
    c = ml_collections.ConfigDict()
    c.data = data_config_lib.data_config()
    c.data.name = name
    c.eval = sections.eval_config()
    c.eval.update(eval_over)
    return c


def _json(boxes, labels):
    items = [
        {"bbox_2d": [int(v) for v in b], "label": x} for b, x in zip(boxes, labels, strict=True)
    ]
    return "```json\n" + json.dumps(items) + "\n```"


TARGETS = [
    Target(np.array([[10, 10, 50, 50], [60, 60, 90, 90]], np.float32), ["cat", "dog"],
           (100, 100), (100, 100), label_to_id={"cat": 1, "dog": 2}),
    Target(np.array([[0, 0, 40, 40]], np.float32), ["cat"], (100, 100), (100, 100),
           label_to_id={"cat": 1, "dog": 2}),
    Target(np.array([[20, 20, 80, 80]], np.float32), ["dog"], (100, 100), (100, 100),
           label_to_id={"cat": 1, "dog": 2}),
]  # fmt: skip


def test_detection_metrics_of_answers_and_the_reward_view():
    boxes = [[[10, 10, 50, 50], [60, 60, 90, 90]], [[30, 30, 70, 70]], []]
    labels = [["cat", "dog"], ["cat"], []]
    texts = [_json(boxes[0], labels[0]), _json(boxes[1], labels[1]), "no idea"]
    answers = [_answer(f"v/{i}", texts[i], TARGETS[i], boxes[i], labels[i], truncated=i == 2)
               for i in range(3)]  # fmt: skip
    got = evaluate.compute_metrics(answers, _config())
    want = evaluate.detection_metrics(
        [(np.asarray(b, np.float32).reshape(-1, 4), x, np.full(len(x), 0.99)) for b, x in
         zip(boxes, labels, strict=True)], TARGETS)  # fmt: skip
    for k, v in want.items():
        assert got[k] == v, k
    assert got["parse_rate"] == pytest.approx(2 / 3, abs=1e-12)
    assert got["truncated_rate"] == pytest.approx(1 / 3, abs=1e-12)
    assert got["num_examples"] == 3
    # matched IoU: pairs (1, 1) (1, 1) from image 0 and IoU([30,30,70,70], [0,0,40,40]) = 100/3100
    assert got["matched_iou"] == pytest.approx((1 + 1 + 100 / 3100) / 3, abs=1e-6)


def test_odinw_metrics_per_set_and_rec_accuracy():
    ids = ["SetA/validation/1/1", "SetA/validation/2/1", "SetB/large/validation/7/2"]
    boxes = [[[10, 10, 50, 50]], [[0, 0, 20, 20]], [[20, 20, 80, 80]]]
    labels = [["cat"], ["cat"], ["dog"]]
    answers = [_answer(ids[i], _json(boxes[i], labels[i]), TARGETS[i], boxes[i], labels[i])
               for i in range(3)]  # fmt: skip
    got = evaluate.compute_metrics(answers, _config("odinw"))
    preds = [
        (np.asarray(b, np.float32), x, np.full(len(x), 0.99))
        for b, x in zip(boxes, labels, strict=True)
    ]
    per_set = {
        "SetA": evaluate.detection_metrics(preds[:2], TARGETS[:2]),
        "SetB/large": evaluate.detection_metrics(preds[2:], TARGETS[2:]),
    }
    want = eval_metrics.odinw_average(per_set)
    assert {k: got[k] for k in want} == want and want["num_sets"] == 2

    rec = [_answer(f"r/{i}", _json(boxes[i], labels[i]), TARGETS[i], boxes[i], labels[i])
           for i in range(3)]  # fmt: skip
    got = evaluate.compute_metrics(rec, _config("refcoco"))
    # first gt box of each: IoU 1 (hit), IoU([0,0,20,20], [0,0,40,40]) = 0.25 (miss), 1 (hit)
    assert got["Acc@0.5"] == pytest.approx(2 / 3, abs=1e-12)
    assert "AP" not in got


@pytest.mark.parametrize(
    "over, message",
    [
        ({"every": -1}, "eval.every=-1"),
        ({"score": "median"}, "eval.score='median'"),
        ({"protocol": "voc"}, "eval.protocol='voc'"),
        ({"max_dets": (10, 1, 100)}, "eval.max_dets"),
        ({"batches": 0}, "eval.batches=0"),
        ({"protocol": "rec", "score": "logprob"}, "no effect with the rec protocol"),
    ],
)
def test_eval_config_is_validated(over, message):
    c = _config(**over)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_lib.validate(c)


def test_eval_every_must_be_a_rollout_boundary():
    c = config_lib.load_config(os.path.join(ROOT, "configs", "demo_cpu.py:experiment=False"))
    c.grpo.num_iterations = 2
    c.eval = sections.eval_config()
    c.eval.every = 3
    with pytest.raises(ValueError, match=r"multiple of grpo\.num_iterations=2"):
        config_lib.validate(c)


# ------------------------------------------------------------------------ the run, end to end

MAX_NEW = 24


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    ckpt = testing.tiny_checkpoint(
        tmp_path_factory, "qwen2_5_vl_tiny", tokenizer="small", min_pixels=3136,
        max_pixels=112 * 112,
    )  # fmt: skip
    data_dir = str(tmp_path_factory.mktemp("eval_data"))
    shapes = synthetic_shapes.ShapesConfig(name="evalrun", num_train=4, num_validation=6)
    synthetic_shapes.SyntheticShapes(config=shapes, data_dir=data_dir).download_and_prepare()
    return ckpt, data_dir


def run_config(ckpt, data_dir, ici=(1, 1, 1)):
    """The command line's config: `configs/demo_cpu.py` with the test's overrides."""
    c = config_lib.load_config(os.path.join(ROOT, "configs", "demo_cpu.py"))
    c.model.checkpoint = ckpt
    c.model.tiny = "qwen2_5_vl_tiny"
    c.data.name, c.data.builder_config, c.data.data_dir = "synthetic_shapes", "evalrun", data_dir
    c.data.batch_size = 8
    c.data.eval_split, c.data.max_prompt_len = "validation", 160  # six categories, small BPE
    c.mesh = sections.mesh_config(ici=ici)
    c.eval = sections.eval_config()
    c.eval.max_new_tokens = MAX_NEW
    c.eval.score = "logprob"
    return c


def test_command_line_answers_are_the_samplers_greedy_answers(assets, tmp_path):
    """`python -m visionr1_jax.evaluate` as a user runs it (flags, config overrides): the JSON
    it writes holds the metrics of the predictions it writes, it prints the table, and its
    answers are the sampler's greedy answers decoded independently. (The same answers on a
    (2, 2, 2) mesh and from 2 processes: test_train_distributed.py.)"""
    import subprocess
    import sys

    ckpt, data_dir = assets
    c = run_config(ckpt, data_dir)
    flags = {
        "model.checkpoint": ckpt, "data.builder_config": "evalrun", "data.data_dir": data_dir,
        "data.batch_size": 8, "data.eval_split": "validation", "data.max_prompt_len": 160,
        "eval.batch_size": 8, "mesh.ici_parallelism": "(1,1,1)", "progress": False,
        "eval.max_new_tokens": MAX_NEW, "eval.score": "logprob",
    }  # fmt: skip
    cmd = [
        sys.executable, "-m", "visionr1_jax.evaluate", f"--config={ROOT}/configs/demo_cpu.py",
        f"--workdir={tmp_path}", "--checkpoint=base",
        *(f"--config.{k}={v}" for k, v in flags.items()),
    ]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": conftest.with_fast_compile("")}  # 1 device, as here
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| AP |" in out.stdout and "detection evaluation of base" in out.stdout
    record = json.loads((tmp_path / "eval" / "base.json").read_text())
    got = record["metrics"]
    assert record["protocol"] == "detection" and record["eval"]["score"] == "logprob"
    lines = (tmp_path / "eval" / "base_predictions.jsonl").read_text().splitlines()
    answers = [evaluate.Answer.from_json(json.loads(x)) for x in lines]
    assert got["num_examples"] == len(answers) == 6
    want = evaluate.detection_metrics([(a.boxes, a.labels, a.scores) for a in answers],
                                      [a.target for a in answers])  # fmt: skip
    assert {k: got[k] for k in want} == {k: float(v) for k, v in want.items()}

    # The same answers, decoded independently from the sampler's greedy tokens on host batches.
    processor = processing.load_processor(ckpt)
    from visionr1_jax.models import hf_weights

    model = hf_weights.from_pretrained(ckpt)
    ip = processor.image_processor  # the pipeline's uint8 patches → pixel_values
    normalize = pipeline.PixelNormalizer(
        mean=tuple(float(v) for v in ip.image_mean),
        std=tuple(float(v) for v in ip.image_std),
        rescale=float(ip.rescale_factor),
        temporal=int(ip.temporal_patch_size),
    )
    texts, ids = [], []
    for hb in pipeline.InputPipeline(data_config_lib.eval_config(c.data), processor):
        batch = {k: hb.arrays[k] for k in ("input_ids", "attention_mask", "image_grid_thw")}
        batch["pixel_values"] = np.asarray(normalize(jax.numpy.asarray(hb.arrays["pixel_patches"])))
        out = sampler.generate(model, batch, rng=jax.random.key(1), max_new_tokens=MAX_NEW,
                               temperature=0.0, cache_dtype=np.float32)  # fmt: skip
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        for i in np.nonzero(hb.arrays["valid"])[0]:
            texts.append(processor.tokenizer.decode(tokens[i][mask[i]], skip_special_tokens=True))
        ids += list(hb.record_ids[i] for i in np.nonzero(hb.arrays["valid"])[0])
    assert [a.completion for a in answers] == texts
    assert [a.record_id for a in answers] == ids
    # every box in original pixels, as the parser maps it
    for a in answers:
        p = parse.parse_answer(a.completion, input_size=a.target.input_size)
        want = parse.to_original_pixels(np.asarray(p.boxes).reshape(-1, 4), "qwen25_abs",
                                        a.target.image_size, a.target.input_size)  # fmt: skip
        np.testing.assert_array_equal(a.boxes, want)
