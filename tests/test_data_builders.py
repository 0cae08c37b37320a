"""Each builder against a small fixture written in its real on-disk format (no TensorFlow)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from visionr1_jax.data import records, templates
from visionr1_jax.data.builders import (
    coco_detection,
    odinw,
    refcoco,
    synthetic_shapes,
    vision_r1_data,
)

QWEN_DET = (
    "Locate every item from the category list in the image and output the coordinates in JSON "
    "format. The category set includes {}."
)
QWEN_GROUND = "Locate every {} in the image and output the coordinates in JSON format."
GRIFFON_DET = (
    "Examine the image for any objects from the category set. Report the coordinates of each "
    "detected object. The category set includes {}."
)
GRIFFON_GROUND = "Locate the exact position of {} in the picture, if you can."
GRIFFON_REC = "Can you point out {} in the image and provide the coordinates of its location?"


def _image(w: int, h: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _build(builder_cls, tmp_path, manual_dir=None, **config):
    builder = builder_cls(config=config.pop("config"), data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir or tmp_path))
    )
    return {
        split: {records.as_text(r["id"]): r for r in (src[i] for i in range(len(src)))}
        for split, src in builder.as_data_source().items()
    }


def _text(record, key):
    return records.as_text(record[key])


def _assert_record(r, *, image, width, height, task, prompt, boxes, labels, label_map, source):
    assert r["image"] == image
    assert int(r["width"]) == width and int(r["height"]) == height
    assert _text(r, "task") == task
    assert _text(r, "prompt") == prompt
    # Stored as float32 and read back: exact (xywh -> xyxy sums here are exact in float32).
    np.testing.assert_array_equal(r["boxes"], np.asarray(boxes, np.float32).reshape(-1, 4))
    assert r["boxes"].dtype == np.float32
    assert records.text_list(r["labels"]) == list(labels)
    assert json.loads(_text(r, "label_map")) == label_map
    assert _text(r, "source") == source


# ----------------------------------------------------------------------------- synthetic_shapes


def test_synthetic_shapes_detection_boxes_are_exact_and_deterministic(tmp_path):
    cfg = dict(name="t", num_train=24, num_validation=6, texture=False, max_overlap=0.0,
               max_shapes=4)  # fmt: skip
    a = _build(synthetic_shapes.SyntheticShapes, tmp_path / "a",
               config=synthetic_shapes.ShapesConfig(**cfg))  # fmt: skip
    b = _build(synthetic_shapes.SyntheticShapes, tmp_path / "b",
               config=synthetic_shapes.ShapesConfig(**cfg))  # fmt: skip
    assert set(a) == {"train", "validation"}
    assert len(a["train"]) == 24 and len(a["validation"]) == 6
    label_map = {s: i + 1 for i, s in enumerate(synthetic_shapes.SHAPES)}
    counts = set()
    for split in a:
        for rid, r in a[split].items():
            split_name, index = rid.split("/")
            assert split_name == split
            assert r["image"] == b[split][rid]["image"]  # same config, same bytes
            image = np.asarray(Image.open(io.BytesIO(r["image"])))
            assert image.shape == (112, 112, 3)
            boxes = r["boxes"]
            counts.add(len(boxes))
            assert 1 <= len(boxes) <= 4
            _assert_record(
                r, image=r["image"], width=112, height=112, task="detection",
                prompt=QWEN_DET.format("circle, square, triangle, diamond, star, hexagon"),
                boxes=boxes, labels=records.text_list(r["labels"]), label_map=label_map,
                source="synthetic_shapes",
            )  # fmt: skip
            assert set(records.text_list(r["labels"])) <= set(synthetic_shapes.SHAPES)
            # Non-overlapping shapes on a plain background: each box is exactly the extent of
            # the pixels that differ from the background inside it.
            background = image[0, 0] if (boxes[:, :2] > 0).all() else image[-1, -1]
            for x1, y1, x2, y2 in boxes.astype(int):
                crop = (image[y1:y2, x1:x2] != background).any(-1)
                ys, xs = np.nonzero(crop)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x2 - x1, y2 - y1)
            assert json.loads(_text(r, "meta"))["index"] == int(index)
    assert len(counts) > 1  # varied counts


def test_synthetic_shapes_grounding_one_prompt_per_category(tmp_path):
    det = synthetic_shapes.ShapesConfig(name="d", num_train=10, num_validation=2, max_shapes=5)
    grd = synthetic_shapes.ShapesConfig(name="g", num_train=10, num_validation=2, max_shapes=5,
                                        task="grounding", template="griffon")  # fmt: skip
    d = _build(synthetic_shapes.SyntheticShapes, tmp_path / "d", config=det)["train"]
    g = _build(synthetic_shapes.SyntheticShapes, tmp_path / "g", config=grd)["train"]
    expected = 0
    for rid, r in d.items():
        labels = records.text_list(r["labels"])
        for shape in sorted(set(labels)):
            expected += 1
            q = g[f"{rid}/{shape}"]
            keep = [i for i, lab in enumerate(labels) if lab == shape]
            _assert_record(
                q, image=r["image"], width=112, height=112, task="grounding",
                prompt=GRIFFON_GROUND.format(shape), boxes=r["boxes"][keep],
                labels=[shape] * len(keep),
                label_map={shape: synthetic_shapes.SHAPES.index(shape) + 1},
                source="synthetic_shapes",
            )  # fmt: skip
    assert len(g) == expected


# ------------------------------------------------------------------------------ coco_detection


def _coco_json(images, annotations, categories):
    return json.dumps({"images": images, "annotations": annotations, "categories": categories})


def _write_coco(root, split_name, images, annotations, categories, files):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split_name}.json").write_text(
        _coco_json(images, annotations, categories)
    )
    (root / split_name).mkdir(exist_ok=True)
    for name, data in files.items():
        (root / split_name / name).write_bytes(data)


COCO_CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]


@pytest.mark.parametrize("prompt_categories", ["all", "present"])
def test_coco_detection(tmp_path, prompt_categories):
    root = tmp_path / "coco"
    jpg1, jpg2 = _image(64, 48, seed=1), _image(40, 30, seed=2)
    images = [
        {"id": 9, "file_name": "000000000009.jpg", "width": 64, "height": 48},
        {"id": 25, "file_name": "000000000025.jpg", "width": 40, "height": 30},
        {"id": 30, "file_name": "000000000030.jpg", "width": 50, "height": 50},  # file missing
    ]
    anns = [
        {"id": 1, "image_id": 9, "category_id": 18, "bbox": [1.5, 2.0, 10.0, 20.0], "iscrowd": 0},
        {"id": 2, "image_id": 9, "category_id": 1, "bbox": [30, 5, 20, 40], "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": 1, "bbox": [0, 0, 64, 48], "iscrowd": 1},
        {"id": 4, "image_id": 30, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 0},
        {"id": 5, "image_id": 30, "category_id": 77, "bbox": [1, 1, 5, 5], "iscrowd": 0},
    ]
    _write_coco(root, "val2017", images, anns, COCO_CATS,
                {"000000000009.jpg": jpg1, "000000000025.jpg": jpg2})  # fmt: skip
    config = coco_detection.CocoConfig(name=f"t_{prompt_categories}",
                                       prompt_categories=prompt_categories)  # fmt: skip
    out = _build(coco_detection.CocoDetection, tmp_path, root, config=config)
    assert set(out) == {"validation"}
    got = out["validation"]
    assert set(got) == {"instances_val2017/9", "instances_val2017/25", "instances_val2017/30"}
    full = {"person": 1, "car": 3, "dog": 18}
    r9 = got["instances_val2017/9"]
    cats9 = ["person", "car", "dog"] if prompt_categories == "all" else ["person", "dog"]
    _assert_record(
        r9, image=jpg1, width=64, height=48, task="detection",
        prompt=QWEN_DET.format(", ".join(cats9)),
        boxes=[[1.5, 2.0, 11.5, 22.0], [30, 5, 50, 45]],  # xywh -> xyxy, crowd left out
        labels=["dog", "person"], label_map={k: full[k] for k in cats9}, source="coco_detection",
    )  # fmt: skip
    assert records.text_list(r9["categories"]) == cats9
    assert json.loads(_text(r9, "meta")) == {"image_id": 9, "file_name": "000000000009.jpg"}
    # A negative image lists every category whatever the option.
    _assert_record(
        got["instances_val2017/25"], image=jpg2, width=40, height=30, task="detection",
        prompt=QWEN_DET.format("person, car, dog"), boxes=np.zeros((0, 4)), labels=[],
        label_map=full, source="coco_detection",
    )  # fmt: skip
    # Missing file -> empty image; unknown category id -> a label outside the label map.
    r30 = got["instances_val2017/30"]
    assert r30["image"] == b""
    assert records.text_list(r30["labels"]) == ["car", "<unknown category id 77>"]
    assert records.check_record(r30).startswith("missing_image")


# ---------------------------------------------------------------------------------------- odinw


def test_odinw_one_grounding_prompt_per_image_and_category(tmp_path):
    root = tmp_path / "odinw"
    sets = {
        "Aquarium/Aquarium Combined.v2-raw-1024.coco": (
            [{"id": 0, "name": "creatures"}, {"id": 1, "name": "fish"}, {"id": 2, "name": "shark"}],
            [
                {"id": 0, "image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4]},
                {"id": 1, "image_id": 0, "category_id": 2, "bbox": [10, 10, 5, 5]},
                {"id": 2, "image_id": 0, "category_id": 1, "bbox": [20, 2, 3, 4]},
                {"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 0, 8, 8]},
            ],
        ),
        "pothole": ([{"id": 0, "name": "potholes"}, {"id": 1, "name": "pothole"}],
                    [{"id": 0, "image_id": 0, "category_id": 1, "bbox": [4, 4, 6, 2]}]),
    }  # fmt: skip
    files = {}
    for set_name, (cats, anns) in sets.items():
        for split in ("valid", "train"):
            d = root / set_name / split
            d.mkdir(parents=True)
            imgs = []
            for i in range(2):
                data = _image(32, 24, seed=len(files))
                files[(set_name, split, i)] = data
                (d / f"img{i}.jpg").write_bytes(data)
                imgs.append({"id": i, "file_name": f"img{i}.jpg", "width": 32, "height": 24})
            (d / odinw.ANNOTATION_FILE).write_text(_coco_json(imgs, anns, cats))
    out = _build(odinw.Odinw, tmp_path, root, config=odinw.OdinwConfig(name="t"))
    assert set(out) == {"train", "validation"}
    aq = "Aquarium/Aquarium Combined.v2-raw-1024.coco"
    for split, folder in (("validation", "valid"), ("train", "train")):
        got = out[split]
        assert set(got) == {
            f"{aq}/{split}/0/1", f"{aq}/{split}/0/2", f"{aq}/{split}/1/2", f"pothole/{split}/0/1"
        }  # fmt: skip
        _assert_record(
            got[f"{aq}/{split}/0/1"], image=files[(aq, folder, 0)], width=32, height=24,
            task="grounding", prompt=QWEN_GROUND.format("fish"),
            boxes=[[1, 2, 4, 6], [20, 2, 23, 6]], labels=["fish", "fish"],
            label_map={"fish": 1}, source=f"odinw/{aq}",
        )  # fmt: skip
        _assert_record(
            got[f"pothole/{split}/0/1"], image=files[("pothole", folder, 0)], width=32,
            height=24, task="grounding", prompt=QWEN_GROUND.format("pothole"),
            boxes=[[4, 4, 10, 6]], labels=["pothole"], label_map={"pothole": 1},
            source="odinw/pothole",
        )  # fmt: skip
        meta = json.loads(_text(got[f"{aq}/{split}/1/2"], "meta"))
        assert meta == {"image_id": 1, "category_id": 2, "file_name": "img1.jpg"}


# ------------------------------------------------------------------------------------- refcoco


def _refcoco_fixture(root):
    (root / "images").mkdir(parents=True)
    img_a, img_b = _image(60, 40, seed=5), _image(30, 30, seed=6)
    (root / "images" / "COCO_train2014_000000000001.jpg").write_bytes(img_a)
    (root / "images" / "COCO_train2014_000000000002.jpg").write_bytes(img_b)
    return img_a, img_b


def test_refcoco_json_form(tmp_path):
    root = tmp_path / "ref"
    img_a, img_b = _refcoco_fixture(root)
    (root / "refcoco").mkdir()
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 60, "height": 40},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 30, "height": 30},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12]},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 20]},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    refs = [
        {"ref_id": 100, "ann_id": 11, "image_id": 1, "split": "train",
         "sentences": [{"sent": "man on the left", "raw": "Man on the left"}, {"sent": "guy"}]},
        {"ref_id": 101, "ann_id": 12, "image_id": 2, "split": "val",
         "sentences": [{"sent": "the big dog"}]},
    ]  # fmt: skip
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    (root / "refcoco" / "refs(unc).json").write_text(json.dumps(refs))
    config = refcoco.RefcocoConfig(name="t", template="griffon")
    out = _build(refcoco.Refcoco, tmp_path, root, config=config)
    assert set(out) == {"train", "validation"}
    r = out["train"]["refcoco/train/100"]
    _assert_record(
        r, image=img_a, width=60, height=40, task="rec",
        prompt=GRIFFON_REC.format("man on the left"), boxes=[[2, 3, 12, 15]],
        labels=["man on the left"], label_map={"man on the left": 1}, source="refcoco",
    )  # fmt: skip
    assert _text(r, "expression") == "man on the left"
    assert json.loads(_text(r, "meta"))["sentences"] == ["man on the left", "guy"]
    _assert_record(
        out["validation"]["refcoco/validation/101"], image=img_b, width=30, height=30,
        task="rec", prompt=GRIFFON_REC.format("the big dog"), boxes=[[5, 5, 25, 25]],
        labels=["the big dog"], label_map={"the big dog": 1}, source="refcoco",
    )  # fmt: skip


def test_refcoco_parquet_form(tmp_path):
    root = tmp_path / "ref"
    img_a, img_b = _refcoco_fixture(root)
    (root / "refcoco+").mkdir()
    table = pa.table({
        "ref_id": [7, 8],
        "image_id": [1, 2],
        "sentences": [["woman in red", "lady"], ["left zebra"]],
        "bbox": [[1.0, 1.0, 20.0, 10.0], [0.0, 2.0, 4.0, 4.0]],
        "image": [{"bytes": img_a, "path": None}, {"bytes": None, "path": None}],
        "file_name": ["COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"],
    })  # fmt: skip
    pq.write_table(table, root / "refcoco+" / "testA-00000-of-00001.parquet")
    config = refcoco.RefcocoConfig(name="tp", dataset="refcoco+")
    out = _build(refcoco.Refcoco, tmp_path, root, config=config)
    assert set(out) == {"testA"}
    _assert_record(
        out["testA"]["refcoco+/testA/7"], image=img_a, width=60, height=40, task="rec",
        prompt=QWEN_GROUND.format("woman in red"), boxes=[[1, 1, 21, 11]],
        labels=["woman in red"], label_map={"woman in red": 1}, source="refcoco+",
    )  # fmt: skip
    # No image bytes in the row: read from the images directory, size from its header.
    _assert_record(
        out["testA"]["refcoco+/testA/8"], image=img_b, width=30, height=30, task="rec",
        prompt=QWEN_GROUND.format("left zebra"), boxes=[[0, 2, 4, 6]], labels=["left zebra"],
        label_map={"left zebra": 1}, source="refcoco+",
    )  # fmt: skip


def test_refcoco_refuses_pickle(tmp_path):
    root = tmp_path / "ref"
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco" / "instances.json").write_text("{}")
    (root / "refcoco" / "refs(unc).p").write_bytes(b"\x80\x04N.")  # a valid pickle of None
    with pytest.raises(ValueError, match=r"refusing to unpickle .*refs\(unc\)\.p"):
        _build(refcoco.Refcoco, tmp_path, root, config=refcoco.RefcocoConfig(name="p"))


# ------------------------------------------------------------------------------ vision_r1_data


def _vision_r1_rows():
    img = [_image(80, 60, seed=10 + i) for i in range(6)]
    rows = [
        # detection, two categories, one with two boxes
        dict(image={"bytes": img[0], "path": "a.jpg"},
             problem="<image>\n" + GRIFFON_DET.format("person, traffic light"),
             solution=json.dumps([["person", [[1, 2, 30, 40], [5, 5, 9, 9]]],
                                  ["traffic light", [[50, 1, 60, 20]]]]),
             width=80, height=60, num_instances=3,
             target_id_maps=json.dumps({"person": 1, "traffic light": 2})),
        dict(image={"bytes": img[1], "path": None}, problem=GRIFFON_GROUND.format("fish"),
             solution=json.dumps([["fish", [[10, 10, 20, 30]]]]), width=80, height=60,
             num_instances=1, target_id_maps=json.dumps({"fish": 1})),
        dict(image={"bytes": img[2], "path": None},
             problem="<image>" + GRIFFON_REC.format("the man holding a red umbrella"),
             solution=json.dumps([["the man holding a red umbrella", [[3, 4, 50, 58]]]]),
             width=80, height=60, num_instances=1,
             target_id_maps=json.dumps({"the man holding a red umbrella": 1})),
        # no instance, and more than 30: written (the 1..30 range is the pipeline's selection)
        dict(image={"bytes": img[3], "path": None}, problem=GRIFFON_GROUND.format("cat"),
             solution="[]", width=80, height=60, num_instances=0,
             target_id_maps=json.dumps({"cat": 1})),
        dict(image={"bytes": img[4], "path": None}, problem=GRIFFON_GROUND.format("bird"),
             solution=json.dumps([["bird", [[1, 1, 2, 2]] * 31]]), width=80, height=60,
             num_instances=31, target_id_maps=json.dumps({"bird": 1})),
        # a prompt in no known template: kept, flagged by the pipeline
        dict(image={"bytes": img[5], "path": None}, problem="Describe the image.",
             solution=json.dumps([["dog", [[1, 1, 9, 9]]]]), width=80, height=60,
             num_instances=1, target_id_maps=json.dumps({"dog": 1})),
    ]  # fmt: skip
    return rows, img


@pytest.mark.parametrize("template", ["qwen25", "griffon"])
def test_vision_r1_data_parquet(tmp_path, template):
    rows, img = _vision_r1_rows()
    root = tmp_path / "vr1" / "data"
    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:4]), root / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), root / "train-00001-of-00002.parquet")
    config = vision_r1_data.VisionR1DataConfig(name=f"t_{template}", template=template)
    out = _build(vision_r1_data.VisionR1Data, tmp_path, tmp_path / "vr1", config=config)
    got = out["train"]
    f0, f1 = "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"
    assert set(got) == {f"{f0}:0", f"{f0}:1", f"{f0}:2", f"{f0}:3", f"{f1}:0", f"{f1}:1"}
    det = {"qwen25": QWEN_DET, "griffon": GRIFFON_DET}[template]
    ground = {"qwen25": QWEN_GROUND, "griffon": GRIFFON_GROUND}[template]
    rec = {"qwen25": QWEN_GROUND, "griffon": GRIFFON_REC}[template]
    _assert_record(
        got[f"{f0}:0"], image=img[0], width=80, height=60, task="detection",
        prompt=det.format("person, traffic light"),
        boxes=[[1, 2, 30, 40], [5, 5, 9, 9], [50, 1, 60, 20]],
        labels=["person", "person", "traffic light"],
        label_map={"person": 1, "traffic light": 2}, source="vision_r1_data",
    )  # fmt: skip
    assert records.text_list(got[f"{f0}:0"]["categories"]) == ["person", "traffic light"]
    _assert_record(
        got[f"{f0}:1"], image=img[1], width=80, height=60, task="grounding",
        prompt=ground.format("fish"), boxes=[[10, 10, 20, 30]], labels=["fish"],
        label_map={"fish": 1}, source="vision_r1_data",
    )  # fmt: skip
    expr = "the man holding a red umbrella"
    _assert_record(
        got[f"{f0}:2"], image=img[2], width=80, height=60, task="rec", prompt=rec.format(expr),
        boxes=[[3, 4, 50, 58]], labels=[expr], label_map={expr: 1}, source="vision_r1_data",
    )  # fmt: skip
    unknown = got[f"{f1}:1"]
    assert _text(unknown, "task") == "unknown"
    assert _text(unknown, "prompt") == "Describe the image."
    assert records.check_record(unknown).startswith("bad_prompt")
    assert json.loads(_text(got[f"{f0}:2"], "meta")) == {"file": f0, "row": 2, "num_instances": 1}


def test_vision_r1_data_arrow_keeps_every_instance_count(tmp_path):
    rows, img = _vision_r1_rows()
    root = tmp_path / "vr1"
    root.mkdir()
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:  # HF save_to_disk format
            writer.write_table(table)
    config = vision_r1_data.VisionR1DataConfig(name="r")  # the default options
    got = _build(vision_r1_data.VisionR1Data, tmp_path, root, config=config)["train"]
    assert len(got) == 6  # 0 and 31 instances included: selecting is the pipeline's job
    r = got["data-00000-of-00001.arrow:4"]
    assert len(r["boxes"]) == 31 and r["image"] == img[4]
    assert len(got["data-00000-of-00001.arrow:3"]["boxes"]) == 0


def test_griffon_prompt_round_trip():
    for task, cats, expr in [("detection", ["a", "b c"], ""), ("grounding", ["fish"], ""),
                             ("rec", [], "the left one")]:  # fmt: skip
        griffon = templates.render_prompt("griffon", task, cats, expr)
        assert templates.parse_griffon_prompt("<image>\n" + griffon) == (task, cats, expr)
    with pytest.raises(ValueError, match="not a Griffon-template prompt"):
        templates.parse_griffon_prompt("What is this?")


def test_tfds_build_command_line(tmp_path):
    """``tfds build`` (through the TF-free wrapper) builds a builder from its manual dir."""
    root = tmp_path / "coco"
    jpg = _image(64, 48, seed=3)
    images = [{"id": 5, "file_name": "5.jpg", "width": 64, "height": 48}]
    anns = [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 0}]
    _write_coco(root, "train2017", images, anns, COCO_CATS, {"5.jpg": jpg})
    cmd = [sys.executable, "-m", "visionr1_jax.data.tfds_cli", "build", "coco_detection",
           "--imports", "visionr1_jax.data.builders", "--config", "present",
           "--data_dir", str(tmp_path / "tfds"), "--manual_dir", str(root),
           "--file_format", "array_record"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    source = tfds.data_source("coco_detection/present", split="train",
                              data_dir=str(tmp_path / "tfds"))  # fmt: skip
    assert len(source) == 1
    _assert_record(
        source[0], image=jpg, width=64, height=48, task="detection", prompt=QWEN_DET.format("car"),
        boxes=[[1, 2, 4, 6]], labels=["car"], label_map={"car": 3}, source="coco_detection",
    )  # fmt: skip
