"""Every bad-data case under both policies: ``skip`` (counted, logged with the id, exported to
metrics, the run goes on) and ``error`` (stops before the first batch with the id and reason);
the instance-count selection and the box notes, which are neither."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from visionr1_jax import processing
from visionr1_jax.data import config as data_config_lib
from visionr1_jax.data import data_config, pipeline, records
from visionr1_jax.data.builders import coco_detection
from visionr1_jax.models import tiny


@pytest.fixture(scope="module")
def processor():
    tok = tiny.small_tokenizer()
    tok.chat_template = processing.CHAT_TEMPLATE
    return processing.build_processor(tok, min_pixels=3136, max_pixels=112 * 112)


def _png(w=64, h=48, seed=0, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _record(rid, **kw):
    base = dict(
        record_id=rid, image=_png(seed=len(rid)), width=64, height=48, task="detection",
        template="qwen25", categories=["cat", "dog"], boxes=[[1, 2, 30, 40]], labels=["cat"],
        label_map={"cat": 1, "dog": 2}, source="test",
    )  # fmt: skip
    base.update(kw)
    return records.make_record(**base)


def _bad_cases():
    jpeg = _png(fmt="JPEG")
    return {
        "missing_image": dict(image=b""),
        "corrupt_bytes": dict(image=b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20),
        "truncated_jpeg": dict(image=jpeg[: len(jpeg) // 2]),
        "wrong_size": dict(width=65),
        # x2 < x1 / y2 < y1: the reference's GIoU assertion would crash on them (SPEC §8).
        "inverted_box_x": dict(boxes=[[1, 2, 30, 40], [10, 10, 9, 20]], labels=["cat", "dog"]),
        "inverted_box_y": dict(boxes=[[1, 20, 30, 19.5]]),
        "nan_box": dict(boxes=[[np.nan, 2, 30, 40]]),
        "unknown_category": dict(labels=["zebra"]),
        # smart_resize raises on an aspect ratio > 200 (issue #9, point 11) ...
        "aspect_ratio_over_200": dict(
            image=_png(w=201, h=1), width=201, height=1, boxes=[[1, 0, 30, 1]]
        ),
        # ... and resizes a 150:1 image to 28 x 1344 px, 3x max_pixels (no bucket holds it).
        "elongated_over_max_pixels": dict(
            image=_png(w=3000, h=20), width=3000, height=20, boxes=[[1, 2, 30, 18]]
        ),
        "unknown_prompt": dict(task="unknown", prompt="Describe the image."),
        "prompt_too_long": dict(prompt="cat " * 400),
    }


EXPECTED_KIND = {
    "missing_image": "missing_image",
    "corrupt_bytes": "corrupt_image",
    "truncated_jpeg": "corrupt_image",
    "wrong_size": "bad_size",
    "inverted_box_x": "degenerate_box",
    "inverted_box_y": "degenerate_box",
    "nan_box": "degenerate_box",
    "unknown_category": "unknown_category",
    "aspect_ratio_over_200": "bad_aspect_ratio",
    "elongated_over_max_pixels": "bad_aspect_ratio",
    "unknown_prompt": "bad_prompt",
    "prompt_too_long": "prompt_too_long",
}


def _cfg(policy, **kw):
    c = data_config()
    c.update(batch_size=2, max_pixels=112 * 112, max_prompt_len=160, max_instances=3,
             bad_data=policy, num_epochs=1, shuffle=False)  # fmt: skip
    c.update(kw)
    return c


def _pipe(c, processor, source):
    return pipeline.InputPipeline(c, processor, source=source, process_index=0, process_count=1)


@pytest.mark.parametrize("case", sorted(EXPECTED_KIND))
def test_skip_policy_counts_logs_and_goes_on(processor, case, caplog):
    source = [_record("good/0"), _record(f"bad/{case}", **_bad_cases()[case]),
              _record("good/1"), _record("good/2")]  # fmt: skip
    kind = EXPECTED_KIND[case]
    assert pipeline.Encoder(processor, _cfg("skip")).encode(source[1]).kind == kind
    with caplog.at_level(logging.WARNING):
        pipe = _pipe(_cfg("skip"), processor, source)
        batches = list(pipe)
    ids = [r for b in batches for r in b.record_ids if r]
    assert ids == ["good/0", "good/1", "good/2"]
    metrics = pipe.metrics()
    assert metrics[f"data/skipped/{kind}"] == 1
    assert metrics["data/skipped_total"] == 1
    assert any(f"bad/{case}" in m and kind in m for m in caplog.messages)


@pytest.mark.parametrize("case", sorted(EXPECTED_KIND))
def test_error_policy_stops_before_training_with_id_and_reason(processor, case):
    source = [_record("good/0"), _record("good/1"), _record(f"bad/{case}", **_bad_cases()[case])]
    with pytest.raises(records.BadRecord, match=f"bad/{case}") as info:
        _pipe(_cfg("error"), processor, source)
    assert info.value.record_id == f"bad/{case}"
    assert info.value.kind == EXPECTED_KIND[case]


def _boxes(n):
    return dict(boxes=[[1, 2, 30, 40]] * n, labels=["cat"] * n)


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_instance_counts_are_a_selection_not_bad_data(processor, policy, caplog):
    """Issue #9 point 7: N outside [min_instances, max_instances] is selected out (counted,
    no warning, never an error), checked before anything else: a crowded record that is
    also bad does not stop an ``error`` run. Selection off keeps every record."""
    source = [_record("n1", **_boxes(1)), _record("n0", **_boxes(0)),
              _record("n3", **_boxes(3)), _record("n4", **_boxes(4)),
              _record("n5_bad", image=b"", **_boxes(5)), _record("n2", **_boxes(2))]  # fmt: skip
    with caplog.at_level(logging.INFO):
        pipe = _pipe(_cfg(policy), processor, source)  # min_instances=1, max_instances=3
        batches = list(pipe)
    assert [r for b in batches for r in b.record_ids if r] == ["n1", "n3", "n2"]
    assert all(b.arrays["gt_boxes"].shape[1] == 3 for b in batches)  # N = max_instances
    m = pipe.metrics()
    assert m["data/selected_out/too_few_instances"] == 1
    assert m["data/selected_out/too_many_instances"] == 2
    assert (m["data/selected_out_total"], m["data/skipped_total"]) == (3, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Negatives in, no upper bound: every good record, N = the next power of two >= 5.
    pipe = _pipe(_cfg("skip", min_instances=0, max_instances=None, batch_size=6), processor,
                 source)  # fmt: skip
    (batch,) = list(pipe)
    assert [r for r in batch.record_ids if r] == ["n1", "n0", "n3", "n4", "n2"]
    assert batch.arrays["gt_boxes"].shape == (6, 4, 4)  # largest kept count 4
    assert batch.arrays["gt_mask"].sum(1).tolist() == [1, 0, 3, 4, 2, 0]
    assert pipe.metrics()["data/skipped/missing_image"] == 1
    assert pipe.metrics()["data/selected_out_total"] == 0


def test_eval_config_keeps_every_image(processor):
    """An evaluation pass scores every image: 0 and > 30 instances are kept."""
    source = [_record(f"n{n}", **_boxes(n)) for n in (0, 1, 30, 31, 63)]
    c = _cfg("error", max_instances=30, num_epochs=None, shuffle=True)
    train = _pipe(c, processor, source)
    assert sorted(r for r in next(train).record_ids) == ["n1", "n30"]
    train.close()
    e = data_config_lib.eval_config(c)
    assert (e.split, e.num_epochs, e.shuffle, c.split) == ("validation", 1, False, "train")
    batches = list(_pipe(e, processor, source))
    assert [r for b in batches for r in b.record_ids if r] == ["n0", "n1", "n30", "n31", "n63"]
    widths = [b.arrays["gt_mask"].shape[1] for b in batches]
    assert widths == [1, 32, 64]  # powers of two: few shapes without an upper bound
    assert [b.arrays["gt_mask"].sum() for b in batches] == [1, 61, 63]


def test_boxes_outside_the_image_or_empty_are_kept_unchanged_and_noted(processor, caplog):
    """As the reference (raw ground truth into its GIoU, asserting only x2 >= x1, y2 >= y1):
    a box sticking out of the image and a zero-width box are kept as they are, counted as
    notes, never warned about; only inverted boxes are bad (tested above)."""
    outside = [[-5, 2, 30, 40], [40, 30, 70, 60]]  # 64x48 image: out by 5, by 6 and 12 px
    empty = [[10, 10, 10, 20], [1, 2, 30, 40]]  # zero width
    rounding = [[0, 0, 64.5, 48.75]]  # within BOX_TOLERANCE: no note (exact in float32)
    source = [_record("outside", boxes=outside, labels=["cat", "dog"]),
              _record("empty", boxes=empty, labels=["dog", "cat"]),
              _record("rounding", boxes=rounding), _record("both", boxes=[outside[1], empty[0]],
              labels=["cat", "cat"])]  # fmt: skip
    for policy in ("skip", "error"):
        with caplog.at_level(logging.WARNING):
            pipe = _pipe(_cfg(policy, batch_size=4), processor, source)
            (batch,) = list(pipe)
        assert batch.record_ids == ("outside", "empty", "rounding", "both")
        for i, boxes in enumerate([outside, empty, rounding, [outside[1], empty[0]]]):
            np.testing.assert_array_equal(batch.arrays["gt_boxes"][i, : len(boxes)], boxes)
        m = pipe.metrics()
        assert (m["data/noted/box_outside_image"], m["data/noted/empty_box"]) == (2, 2)
        assert m["data/skipped_total"] == 0
        assert not caplog.records
    assert pipe.preflight_counts == {"box_outside_image": 2, "empty_box": 2}


def test_preflight_names_the_record_of_an_unforeseen_failure(processor):
    """A check that raises something other than BadRecord still names the record."""
    broken = dict(_record("broken/0"))
    broken["label_map"] = "{not json"
    source = [_record("good/0"), broken]
    with pytest.raises(records.BadRecord, match="broken/0") as info:
        _pipe(_cfg("error"), processor, source)
    assert info.value.kind == "encode_failed"
    pipe = _pipe(_cfg("skip"), processor, source)
    assert [r for b in pipe for r in b.record_ids if r] == ["good/0"]
    assert pipe.metrics()["data/skipped/encode_failed"] == 1


def test_every_kind_mixed_over_two_epochs_with_resume(processor):
    cases = _bad_cases()
    source = []
    for i, case in enumerate(sorted(cases)):
        source += [_record(f"good/{i}"), _record(f"bad/{case}", **cases[case])]
    source += [_record("selected_out/0", **_boxes(0)), _record("selected_out/4", **_boxes(4)),
               _record("noted/0", boxes=[[1, 2, 70, 40]])]  # fmt: skip
    c = _cfg("skip", num_epochs=None, shuffle=True, num_threads=2, prefetch=2)
    pipe = _pipe(c, processor, source)
    good = [f"good/{i}" for i in range(len(cases))] + ["noted/0"]
    batches = [next(pipe) for _ in range(len(good))]  # two epochs of good records, no crash
    ids = [r for b in batches for r in b.record_ids]
    assert sorted(ids) == sorted(good * 2)
    state, metrics = pipe.get_state(), pipe.metrics()
    assert metrics["data/skipped_total"] >= len(cases)
    assert metrics["data/selected_out_total"] >= 2 and metrics["data/noted/box_outside_image"] >= 1
    later = [next(pipe) for _ in range(3)]
    pipe.close()
    resumed = _pipe(c, processor, source)
    resumed.set_state(state)
    assert resumed.metrics() == metrics  # the counters are part of the saved state
    assert [next(resumed).record_ids for _ in range(3)] == [b.record_ids for b in later]
    resumed.close()


def test_coco_fixture_end_to_end_by_name(tmp_path, processor):
    """A built tfds dataset (missing file, unknown category id, out-of-image box, no box, 31
    boxes), opened by name from data_dir as a run does: training selects, evaluation keeps
    every image but the bad ones."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, anns = [], []
    for i in range(6):
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 20, 20]})
        if i != 1:  # image 1 is missing on disk
            (root / "val2017" / f"{i:012d}.jpg").write_bytes(_png(seed=i, fmt="JPEG"))
    anns.append({"id": 10, "image_id": 2, "category_id": 99, "bbox": [2, 2, 5, 5]})
    anns.append({"id": 11, "image_id": 3, "category_id": 1, "bbox": [50, 40, 30, 30]})
    anns = [a for a in anns if a["image_id"] != 4]  # image 4: a negative
    anns += [{"id": 100 + k, "image_id": 5, "category_id": 1, "bbox": [k, 1, 10, 10]}
             for k in range(30)]  # image 5: 31 instances  # fmt: skip
    cats = [{"id": 1, "name": "person"}]
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    builder = coco_detection.CocoDetection(config="all", data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    kw = dict(name="coco_detection", builder_config="all", data_dir=str(tmp_path / "tfds"),
              split="validation")  # fmt: skip
    pipe = pipeline.InputPipeline(_cfg("skip", **kw), processor, process_index=0,
                                  process_count=1)  # fmt: skip
    ids = sorted(r for b in pipe for r in b.record_ids if r)
    assert ids == ["instances_val2017/0", "instances_val2017/3"]  # 3: box kept as annotated
    m = pipe.metrics()
    assert (m["data/skipped/missing_image"], m["data/skipped/unknown_category"],
            m["data/noted/box_outside_image"], m["data/selected_out/too_few_instances"],
            m["data/selected_out/too_many_instances"]) == (1, 1, 1, 1, 1)  # fmt: skip
    with pytest.raises(records.BadRecord, match="2 bad records in all") as info:
        pipeline.InputPipeline(_cfg("error", **kw), processor, process_index=0, process_count=1)
    msg = str(info.value)
    for rid, kind in [("1", "missing_image"), ("2", "unknown_category")]:
        assert f"instances_val2017/{rid}" in msg and kind in msg
    # Evaluation: every image that is not bad, whatever its instance count.
    e = data_config_lib.eval_config(_cfg("skip", max_instances=30, **kw))
    pipe = pipeline.InputPipeline(e, processor, process_index=0, process_count=1)
    ids = sorted(r for b in pipe for r in b.record_ids if r)  # tfds orders by key hash
    assert ids == [f"instances_val2017/{i}" for i in (0, 3, 4, 5)]
    assert pipe.metrics()["data/skipped_total"] == 2


def test_a_shard_with_no_valid_record_stops_instead_of_spinning(processor):
    source = [_record(f"bad/{i}", image=b"") for i in range(3)]
    pipe = _pipe(_cfg("skip", num_epochs=None), processor, source)
    with pytest.raises(RuntimeError, match="all 3 records of this host's shard"):
        next(pipe)
