"""Watching a run (issue 29, point 5): Weights & Biases and TensorBoard hold what
`metrics.jsonl` holds.

- `metrics.wandb` is validated jax-free like every section: a value without effect while W&B
  is off is an error naming the key;
- a tiny GRPO run with `metrics.wandb` (WANDB_MODE=offline: no network) stops at its
  checkpoint (step 2) and is resumed to step 4: both attempts log to the same W&B run id (the
  one the checkpoint's meta keeps), and the offline run files, read back record by record,
  hold every key and value of every `metrics.jsonl` row at its step (NaN/inf as None, as
  metrics.jsonl has them), plus the renderings as images at their steps;
- TensorBoard's own reader (`EventAccumulator`) reads the same scalars (float32) from the
  run's `tensorboard` folder.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_loop import loop_config

from visionr1_jax import checkpoint, config_lib, metrics, sections, train
from visionr1_jax.data.builders import synthetic_shapes
from visionr1_jax.models import tiny

MAX_PIXELS = 112 * 112


def _config(ckpt: str = "", data_dir: str = "") -> ml_collections.ConfigDict:
    # the rendering of step 0 comes after row 1 is computed (μ = 2)
    c = loop_config(ckpt, data_dir, num_iterations=2)
    c.total_steps = 2
    c.log_rollouts = 0
    c.data.builder_config = "wandb"
    c.optim.learning_rate = 1e-3
    c.checkpoint = sections.checkpoint_config()
    c.checkpoint.every = 2
    c.checkpoint.async_save = False
    c.metrics = sections.metrics_config()
    c.metrics.render_every = 2
    c.metrics.render_count = 1
    c.metrics.wandb.enabled = True
    c.metrics.wandb.project = "visionr1-test"
    return c


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("project", "", r"metrics\.wandb\.project='' must be a non-empty string"),
        ("mode", "dryrun", r"metrics\.wandb\.mode='dryrun' must be None .* or one of"),
        ("name", "", r"metrics\.wandb\.name='' must be None or a non-empty string"),
        ("tags", ["a"], r"metrics\.wandb\.tags=\['a'\] is not a key of the metrics\.wandb"),
    ],
)
def test_a_bad_wandb_value_names_its_key(key, value, message):
    c = _config()
    c.metrics.wandb[key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)


@pytest.mark.parametrize("key, value", [("project", "p"), ("entity", "me"), ("name", "n"),
                                        ("mode", "offline")])  # fmt: skip
def test_a_wandb_value_without_effect_while_off_is_an_error(key, value):
    c = _config()
    c.metrics.wandb.enabled = False
    c.metrics.wandb.project = sections.metrics_config().wandb.project
    config_lib.validate(c)  # off, with the defaults: valid
    c.metrics.wandb[key] = value
    with pytest.raises(ValueError, match=rf"metrics\.wandb\.{key}=.* has no effect while "
                       r"metrics\.wandb\.enabled=False"):  # fmt: skip
        config_lib.validate(c)


# ------------------------------------------------------------------------ the offline run


def wandb_records(path: str):
    """The records of a `.wandb` file (W&B's transaction log: leveldb's log format, a 7-byte
    header `:W&B`, magic 0xBEE1, version 0, then 32 KiB blocks of chunks: crc32 of type and
    data, u16 length, u8 type FULL/FIRST/MIDDLE/LAST), each chunk checked, as
    `wandb.proto.wandb_internal_pb2.Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), path
    block, at, parts = 32768, 7, b""
    while at + 7 <= len(data):
        left = block - at % block
        if left < 7:  # a block's tail too short for a header is padding
            at += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[at : at + 7])
        if kind == 0 and n == 0:  # zero padding up to the end of the block
            at += left
            continue
        chunk = data[at + 7 : at + 7 + n]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, (path, at)
        at += 7 + n
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):  # FULL, LAST: a whole record
            yield wandb_internal_pb2.Record.FromString(parts)


def offline_run(run_dir: str) -> tuple[str, dict[int, dict]]:
    """(run id, {step: {key: value}}) of one offline run folder: its history rows, values
    JSON-decoded (`NaN` as float NaN, `null` as None), W&B's own `_...` keys dropped; an image
    is a dict (`path`, `format`, ...) under its key."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run_id, history = None, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            row = history.setdefault(record.history.step.num, {})
            for item in record.history.item:
                keys = [item.key] if item.key else list(item.nested_key)
                if keys[0].startswith("_"):
                    continue
                node = row
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(item.value_json)
    return run_id, history


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_assets")
    ckpt = tiny.write_tiny_checkpoint(
        str(root / "tiny"), "qwen2_5_vl_tiny", tokenizer="small", min_pixels=3136,
        max_pixels=MAX_PIXELS,
    )  # fmt: skip
    shapes = synthetic_shapes.ShapesConfig(name="wandb", num_train=16, num_validation=4)
    synthetic_shapes.SyntheticShapes(config=shapes, data_dir=str(root)).download_and_prepare()
    return ckpt, str(root)


def test_wandb_offline_run_equals_metrics_jsonl_and_a_resumed_run_keeps_its_id(
    assets, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")  # metrics.wandb.mode None: W&B's env choice
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the local workdir holds W&B's files
    workdir = str(tmp_path / "run")
    config = _config(*assets)
    train.run(config, workdir)  # steps 0-1, a checkpoint at 2
    config.total_steps = 4
    train.run(config, workdir)  # resumed at 2: steps 2-3

    runs = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    assert len(runs) == 2, runs
    (first_id, first), (second_id, second) = offline_run(runs[0]), offline_run(runs[1])
    assert first_id == second_id  # the resumed run continues the same W&B run
    assert sorted(first) == [0, 1] and sorted(second) == [2, 3]
    manager = checkpoint.read_only_manager(workdir)
    meta = manager.restore(4, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    assert meta["wandb_run_id"] == first_id  # kept in the checkpoint for the next resume

    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    logged = {**first, **second}
    for row in rows:
        got = dict(logged[row["step"]])
        images = {k: got.pop(k) for k in ("rollout/0",) if k in got}
        want = {k: v for k, v in row.items() if k != "step"}
        assert sorted(got) == sorted(want), row["step"]
        for key, value in want.items():
            assert got[key] == value, (row["step"], key, got[key], value)
        # the renderings (render_every = 2), at their step, as PNG files of the run
        assert bool(images) == (row["step"] % 2 == 0), row["step"]
        for image in images.values():
            assert image["_type"] == "image-file" and image["format"] == "png"
            run = runs[0] if row["step"] < 2 else runs[1]
            assert os.path.exists(os.path.join(run, "files", image["path"]))

    # TensorBoard's own reader: the same scalars, as float32
    acc = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for key in rows[0]:
        if key == "step":
            continue
        got = {e.step: e.value for e in acc.Scalars(key)}
        want = {r["step"]: np.float32(r[key]) for r in rows if r.get(key) is not None}
        assert got == want, key
    assert sorted(acc.Tags()["images"]) == ["rollout/0"]
