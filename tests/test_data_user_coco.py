"""A user's own COCO-format data (``data.name='coco_format'``, ``builders.user_coco``): it
validates, builds on first use, batches the JSON's categories and boxes, evaluates its
validation split once, rebuilds when a JSON changes, routes bad data through the pipeline's
checks, and trains by config alone (``configs/coco_format_example.py``, 2 SFT steps).

The fixture is written here with PIL and ``json`` (expected values by hand, not through the
builder): 3 categories with ids 12, 3, 7 listed out of order, a crowd annotation, images
without annotations, PNG and JPEG files, one in a sub-folder.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from visionr1_jax import config_lib, processing, sections, train
from visionr1_jax.data import data_config, eval_config, pipeline, records
from visionr1_jax.data.builders import user_coco
from visionr1_jax.models import testing

CATEGORIES = [  # not in id order, ids neither 1..K nor contiguous
    {"id": 12, "name": "teddy bear", "supercategory": "toy"},
    {"id": 3, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 7, "name": "hot dog", "supercategory": "food"},
]
NAMES = {3: "traffic light", 7: "hot dog", 12: "teddy bear"}
PROMPT_CATEGORIES = "traffic light, hot dog, teddy bear"  # category-id order
# image id -> (file name, width, height, [(category id, xywh, iscrowd)])
TRAIN = {
    1: ("a.jpg", 64, 48, [(3, [4, 5, 20, 10], 0), (7, [30, 6, 12.5, 20], 0),
                          (12, [0, 0, 10, 10], 1)]),
    2: ("sub/b.png", 80, 60, [(12, [10, 10, 30, 40], 0)]),
    3: ("c.png", 48, 64, []),
    4: ("d.jpg", 96, 64, [(3, [1, 2, 3, 4], 0), (3, [50, 20, 40.5, 30], 0),
                          (7, [0, 0, 96, 64], 0)]),
    5: ("e.png", 64, 64, [(12, [8, 8, 16, 16], 0)]),
}  # fmt: skip
VALIDATION = {
    10: ("f.png", 64, 48, [(7, [2, 3, 10, 10], 0)]),
    11: ("g.jpg", 72, 56, []),
    12: ("h.png", 56, 56, [(3, [5, 5, 20, 20], 0), (12, [25, 25, 20, 20], 0)]),
}
MAX_PIXELS = 112 * 112


def _encoded(w: int, h: int, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _write_split(ann_path, image_dir, split: dict, categories=CATEGORIES, write_images=True):
    images, anns = [], []
    for image_id, (name, w, h, objects) in split.items():
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for k, xywh, crowd in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": k,
                         "bbox": xywh, "iscrowd": crowd, "area": xywh[2] * xywh[3]})  # fmt: skip
        if write_images:
            path = image_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fmt = "JPEG" if name.endswith(".jpg") else "PNG"
            path.write_bytes(_encoded(w, h, fmt, image_id))
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": categories}))  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    _write_split(root / "annotations" / "train.json", root / "images", TRAIN)
    _write_split(root / "annotations" / "val.json", root / "images", VALIDATION)
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return testing.tiny_checkpoint(tmp_path_factory, "qwen2_5_vl_tiny", tokenizer="small")


@pytest.fixture(scope="module")
def processor(ckpt):
    return processing.load_processor(ckpt)


def _data(root, data_dir, **overrides) -> ml_collections.ConfigDict:
    c = data_config()
    c.name = "coco_format"
    c.annotations = {"train": str(root / "annotations" / "train.json"),
                     "validation": str(root / "annotations" / "val.json")}  # fmt: skip
    c.images = {"train": str(root / "images"), "validation": str(root / "images")}
    c.data_dir = str(data_dir)
    c.batch_size = 2
    c.max_pixels = MAX_PIXELS
    c.max_prompt_len = 256
    c.num_threads = 0
    c.prefetch = 0
    for key in ("annotations", "images"):  # replaced, not merged as `update` would
        if key in overrides:
            c[key] = overrides.pop(key)
    c.update(overrides)
    return c


def _pipe(c, processor):
    return pipeline.InputPipeline(c, processor, process_index=0, process_count=1)


def _rows(pipe) -> dict:
    """record id -> (Target, prompt) over every batch of a finite pipeline."""
    out = {}
    for batch in pipe:
        ids = [r for r, v in zip(batch.record_ids, batch.arrays["valid"], strict=True) if v]
        prompts = [p for p, v in zip(batch.prompts, batch.arrays["valid"], strict=True) if v]
        for rid, target, prompt in zip(ids, batch.targets(), prompts, strict=True):
            assert rid not in out, rid  # each record once
            out[rid] = (target, prompt)
    pipe.close()
    return out


def _expected(split_name: str, split: dict) -> dict:
    """record id -> (xyxy boxes, labels, (H, W)) written out from the fixture (crowd left out)."""
    out = {}
    for image_id, (name, w, h, objects) in split.items():
        kept = [(k, xywh) for k, xywh, crowd in objects if not crowd]
        boxes = [[x, y, x + bw, y + bh] for _, (x, y, bw, bh) in kept]
        out[f"{split_name}/{image_id}/{name}"] = (boxes, [NAMES[k] for k, _ in kept], (h, w))
    return out


def test_training_batches_carry_the_json_categories_and_original_pixel_boxes(
    files, processor, tmp_path
):
    c = _data(files, tmp_path, shuffle=False, num_epochs=1)
    config_lib.validate(ml_collections.ConfigDict({"data": c}))
    pipe = _pipe(c, processor)  # built on first use (one process)
    assert pipe.num_batches == math.ceil(len(TRAIN) / 2)
    got = _rows(pipe)
    expected = {k: v for k, v in _expected("train", TRAIN).items() if v[1]}  # 1 <= N <= 30
    assert sorted(got) == sorted(expected)
    for rid, (target, prompt) in got.items():
        boxes, labels, size = expected[rid]
        np.testing.assert_array_equal(target.boxes, np.asarray(boxes, np.float64).reshape(-1, 4))
        assert list(target.labels) == labels and target.image_size == size
        # Label ids are the JSON's category ids; every category is listed in every prompt.
        assert dict(target.label_to_id) == {"traffic light": 3, "hot dog": 7, "teddy bear": 12}
        assert prompt.endswith(f"The category set includes {PROMPT_CATEGORIES}."), prompt
    assert pipe.metrics()["data/selected_out/too_few_instances"] == 1  # c.png, no annotations
    assert pipe.metrics()["data/skipped_total"] == 0


def test_evaluation_reads_the_validation_split_once_with_negatives(files, processor, tmp_path):
    c = _data(files, tmp_path)  # a training config: shuffled, repeated, 1 <= N <= 30
    pipe = _pipe(eval_config(c), processor)
    assert pipe.num_batches == math.ceil(len(VALIDATION) / 2)
    got = _rows(pipe)
    expected = _expected("validation", VALIDATION)
    assert sorted(got) == sorted(expected)  # g.jpg (no annotations) included
    for rid, (target, _) in got.items():
        boxes, labels, size = expected[rid]
        np.testing.assert_array_equal(target.boxes, np.asarray(boxes, np.float64).reshape(-1, 4))
        assert list(target.labels) == labels and target.image_size == size


def test_the_build_is_named_by_the_files_and_rebuilt_when_a_json_changes(files, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(files, root)
    c = _data(root, tmp_path / "tfds")
    name = user_coco.builder_config(c).name
    assert re.fullmatch(r"files_[0-9a-f]{16}", name)
    assert user_coco.builder_config(c).name == name  # deterministic
    # The same files elsewhere (contents and image folder equal) share the build; another
    # image folder, template or annotation content does not.
    same = _data(root, tmp_path / "tfds")
    moved = root / "annotations" / "train_copy.json"
    shutil.copy(root / "annotations" / "train.json", moved)
    same.annotations.train = str(moved)
    assert user_coco.builder_config(same).name == name
    assert user_coco.builder_config(_data(files, tmp_path)).name != name  # other folders
    assert user_coco.builder_config(_data(root, tmp_path, template="griffon")).name != name

    before = pipeline.open_source(c, "train")
    ids = {records.as_text(before[i]["id"]): i for i in range(len(before))}
    np.testing.assert_array_equal(before[ids["train/2/sub/b.png"]]["boxes"], [[10, 10, 40, 50]])
    changed = dict(TRAIN)
    changed[2] = ("sub/b.png", 80, 60, [(12, [11, 10, 30, 40], 0)])  # one box moved
    _write_split(root / "annotations" / "train.json", root / "images", changed,
                 write_images=False)  # fmt: skip
    assert user_coco.builder_config(c).name != name
    after = pipeline.open_source(c, "train")  # a new build
    ids = {records.as_text(after[i]["id"]): i for i in range(len(after))}
    np.testing.assert_array_equal(after[ids["train/2/sub/b.png"]]["boxes"], [[11, 10, 41, 50]])
    assert len(list((tmp_path / "tfds" / "coco_format").iterdir())) == 2
    # Several processes never build: the error gives the command.
    c.annotations.validation = str(moved)
    with pytest.raises(FileNotFoundError, match="tfds_cli prepare --config="):
        pipeline.open_source(c, "train", build_synthetic=False)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: setattr(c, "annotations", {}), r"data.annotations: data.name='coco_format'"),
        (lambda c: setattr(c.annotations, "train", "/nope/train.json"),
         r"data.annotations.train: no such file: '/nope/train.json'"),
        (lambda c: setattr(c.images, "validation", "/nope/images"),
         r"data.images.validation: no such folder: '/nope/images'"),
        (lambda c: setattr(c.images, "test", "/tmp"), r"data.images.test: split 'test' has no"),
        (lambda c: setattr(c, "eval_split", "test"), r"data.eval_split: split 'test' has no"),
        (lambda c: setattr(c, "split", "train[:50%]+test"), r"data.split: split 'test' has no"),
        (lambda c: setattr(c, "builder_config", "grounding"), r"data.builder_config"),
        (lambda c: setattr(c, "name", "synthetic_shapes"),
         r"data.annotations: has no effect with data.name='synthetic_shapes'"),
    ],
)  # fmt: skip
def test_invalid_configs_name_the_key(files, tmp_path, change, message):
    c = _data(files, tmp_path, split="train[:90%]", eval_split="validation[1:]")
    config_lib.validate(ml_collections.ConfigDict({"data": c}))  # sliced splits are fine
    change(c)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(ml_collections.ConfigDict({"data": c}))


def test_images_set_alone_on_another_dataset_is_rejected():
    c = data_config()
    c.images.train = "/data/images"
    with pytest.raises(ValueError, match=r"data.images: has no effect"):
        config_lib.validate(ml_collections.ConfigDict({"data": c}))


def test_bad_data_goes_through_the_pipeline_checks(tmp_path, processor):
    root = tmp_path / "bad"
    split = {
        1: ("ok.png", 64, 48, [(3, [4, 5, 20, 10], 0)]),
        2: ("missing.png", 64, 48, [(3, [4, 5, 20, 10], 0)]),
        3: ("corrupt.jpg", 64, 48, [(3, [4, 5, 20, 10], 0)]),
        4: ("outside.png", 64, 48, [(7, [40, 30, 40, 30], 0)]),  # sticks out: kept, noted
        5: ("empty.png", 64, 48, [(7, [10, 10, 0, 8], 0)]),  # zero width: kept, noted
        6: ("unknown.png", 64, 48, [(99, [4, 5, 20, 10], 0)]),  # no such category
        7: ("inverted.png", 64, 48, [(3, [20, 5, -4, 10], 0)]),  # negative width
        8: ("size.png", 64, 48, [(12, [1, 1, 5, 5], 0)]),  # wrong size in the JSON
    }
    _write_split(root / "train.json", root, split)
    (root / "missing.png").unlink()
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "size.png").write_bytes(_encoded(50, 48, "PNG", 8))
    data = json.loads((root / "train.json").read_text())
    del data["images"][0]["width"], data["images"][0]["height"]  # read from the image
    (root / "train.json").write_text(json.dumps(data))
    c = _data(root, tmp_path / "tfds", annotations={"train": str(root / "train.json")},
              images={}, eval_split="train", shuffle=False, num_epochs=1)  # fmt: skip
    got = _rows(pipe := _pipe(c, processor))
    assert sorted(got) == ["train/1/ok.png", "train/4/outside.png", "train/5/empty.png"]
    assert got["train/1/ok.png"][0].image_size == (48, 64)
    counts = {k: v for k, v in pipe.metrics().items() if v}
    assert counts == {
        "data/skipped/missing_image": 1, "data/skipped/corrupt_image": 1,
        "data/skipped/unknown_category": 1, "data/skipped/degenerate_box": 1,
        "data/skipped/bad_size": 1, "data/skipped_total": 5,
        "data/noted/box_outside_image": 1, "data/noted/empty_box": 1,
    }  # fmt: skip
    c.bad_data = "error"  # stops before training, naming the record (and its file)
    with pytest.raises(records.BadRecord, match=r"train/2/missing.png.*missing_image"):
        _pipe(c, processor)


def test_category_id_0_shifts_the_label_ids(tmp_path):
    """Roboflow exports number categories from 0 (a dataset-level entry); 0 pads gt_classes,
    so the label ids move up by one. Names under two ids are listed once."""
    root = tmp_path / "rf"
    categories = [{"id": 0, "name": "cells"}, {"id": 1, "name": "rbc"},
                  {"id": 2, "name": "wbc"}, {"id": 3, "name": "rbc"}]  # fmt: skip
    _write_split(root / "train.json", root, {1: ("a.png", 32, 32, [(1, [1, 1, 4, 4], 0)])},
                 categories=categories)  # fmt: skip
    c = _data(root, tmp_path / "tfds", annotations={"train": str(root / "train.json")},
              images={}, eval_split="train")  # fmt: skip
    record = pipeline.open_source(c)[0]
    assert json.loads(records.as_text(record["label_map"])) == {"cells": 1, "rbc": 2, "wbc": 3}
    assert records.text_list(record["categories"]) == ["cells", "rbc", "wbc"]
    assert records.text_list(record["labels"]) == ["rbc"]


def test_unusable_files_are_build_errors_naming_the_file(tmp_path):
    root = tmp_path / "files"
    _write_split(root / "train.json", root / "images", {1: ("a.png", 8, 8, [])})
    c = _data(root, tmp_path / "tfds", annotations={"train": str(root / "train.json")},
              images={"train": str(root)}, eval_split="train")  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"none of the 1 images of .*train.json is "
                       r"under .*files.*data.images.train"):  # fmt: skip
        pipeline.open_source(c)
    for text, message in [
        ('{"images": [{"id": 1}], "categories": []}', "not a COCO instances JSON"),
        ('{"images": [], "categories": [{"id": 1, "name": "x"}]}', "no 'images'"),
        ('{"images": [{"id": 1, "file_name": "a.png"}]}', "no 'categories'"),
        ("[1, 2]", "not a COCO instances JSON"),
    ]:
        (root / "train.json").write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(root / "train.json")) + ".*" + message):
            pipeline.open_source(c)


def test_prepare_builds_what_a_multi_process_run_opens(files, tmp_path, capsys):
    """``tfds_cli prepare`` with the run's --config and overrides, then the run's open."""
    from visionr1_jax.data import tfds_cli

    spec = (f"configs/coco_format_example.py:annotations={files / 'annotations' / 'train.json'},"
            f"images={files / 'images'}")  # fmt: skip
    tfds_cli.prepare(["prog", f"--config={spec}", f"--config.data.data_dir={tmp_path}"])
    assert "coco_format train[:90%]: 4 records" in capsys.readouterr().out  # 90% of 5 images
    config = config_lib.load_config(spec)
    config.data.data_dir = str(tmp_path)
    source = pipeline.open_source(config.data, "train[90%:]", build_synthetic=False)
    assert len(source) == 1


def test_trains_by_config_alone(files, ckpt, tmp_path):
    """The example config pointed at the files, 2 SFT steps of ``train.run``."""
    train_json, val_json = files / "annotations" / "train.json", files / "annotations" / "val.json"
    config = config_lib.load_config(
        f"configs/coco_format_example.py:annotations={train_json},images={files / 'images'},"
        f"val_annotations={val_json}"
    )
    config.objective = "sft"
    config.total_steps = 2
    config.progress = False
    config.model.checkpoint = ckpt
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.batch_size = 2
    config.data.num_threads = 0
    config.data.prefetch = 0
    config.data.max_pixels = config.data.min_pixels = 56 * 56  # 4 image tokens
    config.data.max_prompt_len = 128
    config.sft.max_answer_len = 64  # one target length L for every batch: one compile
    config.metrics.render_every = 0
    config.mesh = sections.mesh_config(ici=(1, 1, 1))
    del config["checkpoint"]
    config_lib.validate(config)
    rows = train.run(config, str(tmp_path / "workdir"))
    assert [m["step"] for m in rows] == [0, 1]
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in rows)
    assert (tmp_path / "tfds" / "coco_format").is_dir()  # built on first use
