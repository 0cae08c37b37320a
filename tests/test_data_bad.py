"""Every bad-data case under both policies: ``skip`` (counted, logged with the id, exported to
metrics, the run goes on) and ``error`` (stops before the first batch with the id and reason)."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from visionr1_jax import processing
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
        "degenerate_box": dict(boxes=[[1, 2, 30, 40], [10, 10, 10, 20]], labels=["cat", "dog"]),
        "nan_box": dict(boxes=[[np.nan, 2, 30, 40]]),
        "box_out_of_image": dict(boxes=[[1, 2, 70, 40]]),
        "too_many_instances": dict(boxes=[[1, 2, 30, 40]] * 4, labels=["cat"] * 4),
        "unknown_category": dict(labels=["zebra"]),
        "unknown_prompt": dict(task="unknown", prompt="Describe the image."),
        "prompt_too_long": dict(prompt="cat " * 400),
    }


EXPECTED_KIND = {
    "missing_image": "missing_image",
    "corrupt_bytes": "corrupt_image",
    "truncated_jpeg": "corrupt_image",
    "wrong_size": "bad_size",
    "degenerate_box": "degenerate_box",
    "nan_box": "degenerate_box",
    "box_out_of_image": "box_out_of_image",
    "too_many_instances": "too_many_instances",
    "unknown_category": "unknown_category",
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


def test_too_few_instances_is_a_selection_under_both_policies(processor):
    source = [_record("good/0"), _record("neg/0", boxes=np.zeros((0, 4)), labels=[]),
              _record("good/1")]  # fmt: skip
    for policy in ("skip", "error"):
        pipe = _pipe(_cfg(policy), processor, source)
        ids = [r for b in pipe for r in b.record_ids if r]
        assert ids == ["good/0", "good/1"]
        assert pipe.metrics()["data/filtered/too_few_instances"] == 1
        assert pipe.metrics()["data/skipped_total"] == 0
    # With min_instances=0 the negative sample is a valid prompt.
    pipe = _pipe(_cfg("error", min_instances=0), processor, source)
    assert [r for b in pipe for r in b.record_ids if r] == ["good/0", "neg/0", "good/1"]


def test_every_kind_mixed_over_two_epochs_with_resume(processor):
    cases = _bad_cases()
    source = []
    for i, case in enumerate(sorted(cases)):
        source += [_record(f"good/{i}"), _record(f"bad/{case}", **cases[case])]
    c = _cfg("skip", num_epochs=None, shuffle=True, num_threads=2, prefetch=2)
    pipe = _pipe(c, processor, source)
    n_good = len(cases)
    batches = [next(pipe) for _ in range(n_good)]  # two epochs of good records, no crash
    ids = [r for b in batches for r in b.record_ids]
    assert sorted(ids) == sorted([f"good/{i}" for i in range(n_good)] * 2)
    state, metrics = pipe.get_state(), pipe.metrics()
    assert metrics["data/skipped_total"] >= len(cases)
    later = [next(pipe) for _ in range(3)]
    pipe.close()
    resumed = _pipe(c, processor, source)
    resumed.set_state(state)
    assert resumed.metrics() == metrics  # the counters are part of the saved state
    assert [next(resumed).record_ids for _ in range(3)] == [b.record_ids for b in later]
    resumed.close()


def test_coco_fixture_end_to_end_by_name(tmp_path, processor):
    """A built tfds dataset (missing file, unknown category id, out-of-image box), opened by
    name from data_dir as a run does."""
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
    assert ids == ["instances_val2017/0", "instances_val2017/4", "instances_val2017/5"]
    m = pipe.metrics()
    assert (m["data/skipped/missing_image"], m["data/skipped/unknown_category"],
            m["data/skipped/box_out_of_image"]) == (1, 1, 1)  # fmt: skip
    with pytest.raises(records.BadRecord, match="3 bad records in all") as info:
        pipeline.InputPipeline(_cfg("error", **kw), processor, process_index=0, process_count=1)
    msg = str(info.value)
    for rid, kind in [("1", "missing_image"), ("2", "unknown_category"), ("3", "box_out_of_image")]:
        assert f"instances_val2017/{rid}" in msg and kind in msg


def test_a_shard_with_no_valid_record_stops_instead_of_spinning(processor):
    source = [_record(f"bad/{i}", image=b"") for i in range(3)]
    pipe = _pipe(_cfg("skip", num_epochs=None), processor, source)
    with pytest.raises(RuntimeError, match="all 3 records of this host's shard"):
        next(pipe)
