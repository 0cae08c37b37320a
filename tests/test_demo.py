"""The `make demo` experiment's parts (issue 26): its tokenizer, its data, the multi-seed record
and how the table prints it.

The tokenizer is checked against the text a demo run produces (the chat template, every prompt
and answer format) and against arbitrary text: it must decode back exactly, as the reward
parses decoded text. The data is checked against what the renderer draws.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import stats

from visionr1_jax import config_lib, experiment, processing, sft
from visionr1_jax.data import shapes, templates
from visionr1_jax.data.builders import synthetic_shapes
from visionr1_jax.models import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    t = tiny.demo_tokenizer()
    t.chat_template = processing.CHAT_TEMPLATE
    return t


def _answers(rng, n):
    boxes = np.sort(rng.uniform(0, 112, (n, 4)), axis=1)[:, [0, 2, 1, 3]]
    labels = ["circle"] * n
    out = [sft.answer_text(boxes, labels, "qwen25_abs", (112, 112), (112, 112))]
    out += [templates.format_answer(boxes, labels, f, (112, 112), (112, 112))
            for f in ("qwen25_abs", "rel1000", "norm01")]  # fmt: skip
    return out


def test_demo_tokenizer_round_trips_the_demo_text_and_any_text(tok):
    rng = np.random.default_rng(1)
    prompt = templates.render_prompt("qwen25", "detection", ["circle"], None)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    texts = [chat, *_answers(rng, 1), *_answers(rng, 3)]
    # text the corpus never had: other words, unicode, digits glued to letters, tabs
    texts += ['Zürich 42°C, naïve "x": [1e-3, -7] \t\n 日本 bbox_3d x2y', "🙂 ```python```"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_demo_tokenizer_makes_short_sequences_with_one_token_per_digit(tok, monkeypatch):
    small = tiny.small_tokenizer()
    prompt = templates.render_prompt("qwen25", "detection", ["circle"], None)
    one = sft.answer_text(np.array([[3.0, 45, 67, 108]]), ["circle"], "qwen25_abs",
                          (112, 112), (112, 112))  # fmt: skip
    enc = lambda t, s: t(s, add_special_tokens=False)["input_ids"]
    # a prompt word is one token; a number is one token per digit (as Qwen's tokenizer)
    assert len(enc(tok, prompt)) == len(prompt.split()) + 2  # the two full stops
    digits = [tok.convert_ids_to_tokens(i) for i in enc(tok, one)]
    assert [d for d in digits if d.isdigit()] == list("34567108")
    # the issue's measure: sequences of a few dozen tokens, against the small byte-level BPE
    assert len(enc(tok, one)) <= 22 < len(enc(small, one))
    assert len(enc(tok, prompt)) <= 26 and 2 * len(enc(tok, prompt)) < len(enc(small, prompt))
    for token in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|endoftext|>"):
        assert tok.convert_tokens_to_ids(token) is not None
    # deterministic: two builds give the same vocabulary
    assert tiny.demo_tokenizer().get_vocab() == tok.get_vocab()


def _built(name, split):
    config = next(c for c in synthetic_shapes.SyntheticShapes.BUILDER_CONFIGS if c.name == name)
    return config, list(
        synthetic_shapes.SyntheticShapes(config=config)._generate_examples(split, 40)
    )


def test_demo_data_lists_shapes_left_to_right_and_ood_differs_in_what_the_issue_names():
    multi, rows = _built("demo_multi", "train")
    counts = []
    for key, record in rows:
        _, boxes, _, colors = shapes.render(multi, "train", int(key.split("/")[1]))
        order = np.lexsort((boxes[:, 1], boxes[:, 0]))  # by x1, then y1: the oracle
        got = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
        np.testing.assert_array_equal(got, boxes[order])
        assert json.loads(record["meta"])["colors"] == [colors[i] for i in order]
        counts.append(len(boxes))
    assert set(counts) == {1, 2, 3}
    demo, rows = _built("demo", "train")
    colors_seen = set()
    for key, record in rows:
        _, boxes, _, colors = shapes.render(demo, "train", int(key.split("/")[1]))
        np.testing.assert_array_equal(np.asarray(record["boxes"]).reshape(-1, 4), boxes)
        assert len(boxes) == 1
        colors_seen |= set(colors)
    assert colors_seen == set(synthetic_shapes.DEMO_COLORS)
    ood, ood_rows = _built("demo_ood", "test")
    seen, sides = set(), []
    for key, _ in ood_rows:
        _, boxes, _, colors = shapes.render(ood, "test", int(key.split("/")[1]))
        seen |= set(colors)
        sides += list((boxes[:, 2] - boxes[:, 0]) / ood.image_size)
    assert seen and not seen & set(synthetic_shapes.DEMO_COLORS)  # colours never trained on
    assert ood.texture and not demo.texture  # backgrounds never trained on
    # sizes outside the training range on both sides
    assert min(sides) < demo.min_scale and max(sides) > demo.max_scale
    # the test split is drawn apart from train and validation
    assert shapes.SPLITS.index("test") == 2


def test_demo_config_evaluates_enough_boxes_that_one_moves_map_below_0_1():
    c = config_lib.load_config(os.path.join(ROOT, "configs", "demo_cpu.py"))
    assert c.data.eval_split == "test" and c.experiment.ood_builder_config == "demo_ood"
    config, _ = _built("demo", "test")
    boxes = sum(len(shapes.render(config, "test", i)[1]) for i in range(config.num_test))
    # one box more or less matched moves AP at each IoU threshold by at most ~100/boxes points
    assert 100 / boxes < 0.1


def test_t_interval_is_students():
    from benchmarks import demo_seeds

    x = [0.1, 0.4, 0.25, 0.3, 0.05]
    got = demo_seeds.t_interval(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert got["mean"] == pytest.approx(np.mean(x)) and got["n"] == 5
    assert (got["lo"], got["hi"]) == pytest.approx((lo, hi), rel=1e-12)


def test_table_prints_the_committed_record_beside_the_run():
    metrics = {"AP": 0.2, "AP50": 0.5, "AP75": 0.1, "AR100": 0.3, "matched_iou": 0.6,
               "parse_rate": 1.0}  # fmt: skip
    results = {k: metrics for k, _ in experiment.ROWS}
    stat = {"mean": 0.123, "lo": 0.1, "hi": 0.15, "n": 5}
    reference = {
        "seeds": [0, 1, 2, 3, 4],
        "rows": {k: {"AP": stat} for k, _ in experiment.ROWS},
        "paired": {"AP": {"mean": 0.01, "lo": -0.002, "hi": 0.02, "n": 5}, "AP75": stat},
    }
    table = experiment.format_table(results, reference=reference)
    assert "committed 5-seed mAP (95% CI)" in table.splitlines()[0]
    assert table.count("| 12.30 [10.00, 15.00] |") == len(experiment.ROWS)
    assert "mAP +1.00 [-0.20, +2.00]" in table
    note = experiment.reference_note({"seeds": [0, 1], "source": "x"})
    assert "not this run's" in note and "2 seeds" in note


def test_committed_record_is_the_one_the_demo_reads():
    c = config_lib.load_config(os.path.join(ROOT, "configs", "demo_cpu.py"))
    record = experiment.read_reference(c)
    assert record["seeds"] == [0, 1, 2, 3, 4]
    for domain in ("in_domain", "out_of_domain"):
        per_seed = [r["results" if domain == "in_domain" else "results_ood"] for r in
                    record["per_seed"]]  # fmt: skip
        diff = [p["grpo"]["AP"] - p["sft_more"]["AP"] for p in per_seed]
        assert record[domain]["paired"]["AP"]["mean"] == pytest.approx(np.mean(diff))
    json.dumps(record)  # plain JSON
