"""Input pipeline: parity with the HF processor, determinism, exact resume, global arrays,
and per-host sharding with 2 real JAX processes."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from visionr1_jax import processing
from visionr1_jax.data import data_config, pipeline, records
from visionr1_jax.data.builders import synthetic_shapes
from visionr1_jax.models import tiny

MAX_PIXELS = 112 * 112
# pixel_values = (x/255 - mean)/std: |v| <= 2.15 (ulp 2.4e-7). Each side (HF in float64 then
# float32, ours in float32 with or without FMA) rounds <= 3 times before the division by
# std >= 0.26 (x3.8) and once after: <= (3 x 6e-8) x 3.8 + 1.2e-7 ~ 8e-7 from the exact value,
# so two implementations agree within 1.6e-6 -> 2e-6; one grey level of resize is 1.5e-2.
PIXEL_ATOL = 2e-6


def make_processor(max_pixels: int = MAX_PIXELS):
    tok = tiny.small_tokenizer()
    tok.chat_template = processing.CHAT_TEMPLATE
    return processing.build_processor(tok, min_pixels=3136, max_pixels=max_pixels)


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def shapes_source(tmp_path_factory, name: str, **kw):
    config = synthetic_shapes.ShapesConfig(name=name, **kw)
    data_dir = str(tmp_path_factory.mktemp(name))
    builder = synthetic_shapes.SyntheticShapes(config=config, data_dir=data_dir)
    builder.download_and_prepare()
    return builder.as_data_source(), data_dir


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    src, _ = shapes_source(tmp_path_factory, "pipe", num_train=40, num_validation=8)
    return src["train"]


def cfg(**overrides):
    c = data_config()
    c.batch_size = 4
    c.max_pixels = MAX_PIXELS
    c.max_prompt_len = 160
    c.update(overrides)
    return c


def take(pipe, n):
    return [next(pipe) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.record_ids == y.record_ids
        assert x.arrays.keys() == y.arrays.keys()
        for key in x.arrays:
            np.testing.assert_array_equal(x.arrays[key], y.arrays[key], err_msg=key)


def test_encoder_matches_the_hf_processor(tmp_path_factory):
    # Images of several sizes and aspect ratios, resized by smart resize within the bounds.
    proc = make_processor(max_pixels=200 * 28 * 28)
    c = cfg(max_pixels=200 * 28 * 28, max_prompt_len=512)
    enc = pipeline.Encoder(proc, c)
    enc_u8 = pipeline.Encoder(proc, cfg(max_pixels=200 * 28 * 28, max_prompt_len=512,
                                        pixels="uint8"))  # fmt: skip
    c.pixels = "float32"
    enc = pipeline.Encoder(proc, c)
    rng = np.random.default_rng(0)
    modes = ["RGB", "RGBA", "L", "P", "RGB"]  # alpha is composited onto white, as HF does
    for (h, w), mode in zip([(100, 100), (37, 290), (480, 640), (333, 77), (64, 64)], modes,
                            strict=True):  # fmt: skip
        buf = io.BytesIO()
        pixels = rng.integers(0, 255, (h, w, 4), np.uint8)
        image = Image.fromarray(pixels, "RGBA")
        image = image.convert(mode) if mode != "RGBA" else image
        image.save(buf, format="PNG" if mode != "RGB" or h != 64 else "JPEG")
        record = records.make_record(
            record_id=f"r{h}x{w}", image=buf.getvalue(), width=w, height=h, task="grounding",
            template="qwen25", categories=["cat"], boxes=[[1, 1, 20, 30]], labels=["cat"],
            label_map={"cat": 7}, source="test",
        )  # fmt: skip
        ex = enc.encode(record)
        assert isinstance(ex, pipeline.Example), ex
        text = processing.render_prompt(proc, records.as_text(record["prompt"]))
        image = Image.open(io.BytesIO(record["image"]))  # the processor converts it itself
        ref = processing.encode_batch(proc, [text], [[image]])
        np.testing.assert_array_equal(ex.input_ids, ref["input_ids"][0])
        np.testing.assert_array_equal(ex.grid_thw, ref["image_grid_thw"][0])
        np.testing.assert_allclose(ex.pixel_values, ref["pixel_values"], atol=PIXEL_ATOL)
        # uint8 transport + on-device normalisation gives the same pixel_values.
        raw = enc_u8.encode(record)
        assert raw.pixel_values.dtype == np.uint8 and raw.pixel_values.shape[1] == 3 * 14 * 14
        on_device = jax.jit(enc_u8.normalizer)(raw.pixel_values)
        np.testing.assert_allclose(np.asarray(on_device), ref["pixel_values"], atol=PIXEL_ATOL)
        np.testing.assert_array_equal(raw.input_ids, ex.input_ids)
        h_in, w_in = ex.input_size
        assert (h_in, w_in) == (ex.grid_thw[1] * 14, ex.grid_thw[2] * 14)
        assert 3136 <= h_in * w_in <= 200 * 28 * 28
        assert ex.image_size == (h, w)
        np.testing.assert_array_equal(ex.classes, [7])


def test_batches_have_static_shapes_and_the_records_ground_truth(processor, shapes):
    pipe = pipeline.InputPipeline(cfg(), processor, source=shapes, process_index=0,
                                  process_count=1)  # fmt: skip
    by_id = {records.as_text(shapes[i]["id"]): shapes[i] for i in range(len(shapes))}
    for batch in take(pipe, 3):
        a = batch.arrays
        assert a["input_ids"].shape == (4, 160) and a["pixel_patches"].shape == (4, 64, 588)
        assert a["gt_boxes"].shape == (4, 30, 4) and a["valid"].all()
        for i, rid in enumerate(batch.record_ids):
            r = by_id[rid]
            n = len(r["boxes"])
            np.testing.assert_array_equal(a["gt_boxes"][i, :n], r["boxes"])
            assert a["gt_mask"][i].sum() == n
            lm = json.loads(records.as_text(r["label_map"]))
            assert a["gt_classes"][i, :n].tolist() == [
                lm[x] for x in records.text_list(r["labels"])
            ]
            assert batch.labels[i] == tuple(records.text_list(r["labels"]))
            assert a["image_size"][i].tolist() == [112, 112]
            assert a["input_size"][i].tolist() == [112, 112]
            k = a["attention_mask"][i].sum()
            assert a["attention_mask"][i, -k:].all()  # left padded
            assert batch.prompts[i] == records.as_text(r["prompt"])
        for i, target in enumerate(batch.targets()):  # the rewards' host type
            r = by_id[batch.record_ids[i]]
            np.testing.assert_array_equal(target.boxes, r["boxes"])
            assert list(target.labels) == records.text_list(r["labels"])
            assert tuple(target.image_size) == (112, 112) == tuple(target.input_size)
            assert dict(target.label_to_id) == json.loads(records.as_text(r["label_map"]))
    pipe.close()


def test_same_seed_same_batches_other_seed_other_order(processor, shapes):
    def run(seed):
        pipe = pipeline.InputPipeline(cfg(seed=seed), processor, source=shapes,
                                      process_index=0, process_count=1)  # fmt: skip
        out = take(pipe, 12)  # 48 records: crosses the 40-record epoch boundary
        pipe.close()
        return out

    a, b, other = run(3), run(3), run(4)
    assert_same_batches(a, b)
    ids = [rid for batch in a for rid in batch.record_ids]
    assert sorted(ids[:40]) == sorted(records.as_text(shapes[i]["id"]) for i in range(40))
    assert ids[40:48] != ids[:8]  # epoch 2 is reshuffled
    assert ids != [rid for batch in other for rid in batch.record_ids]


@pytest.mark.parametrize("threads,prefetch", [(2, 2), (0, 0)])
def test_resume_exactly_from_a_saved_state_mid_epoch(processor, shapes, threads, prefetch):
    c = cfg(num_threads=threads, prefetch=prefetch)
    pipe = pipeline.InputPipeline(c, processor, source=shapes, process_index=0, process_count=1)
    take(pipe, 3)  # 12 of 40 records: mid-epoch
    state = pipe.get_state()
    expected = take(pipe, 9)  # runs into the second epoch
    pipe.close()
    resumed = pipeline.InputPipeline(c, processor, source=shapes, process_index=0,
                                     process_count=1)  # fmt: skip
    resumed.set_state(state)
    assert_same_batches(resumed_batches := take(resumed, 9), expected)
    assert (
        resumed_batches[0].record_ids
        != take(
            pipeline.InputPipeline(c, processor, source=shapes, process_index=0, process_count=1), 1
        )[0].record_ids
    )
    with pytest.raises(ValueError, match="seed"):
        pipeline.InputPipeline(cfg(seed=9), processor, source=shapes, process_index=0,
                               process_count=1).set_state(state)  # fmt: skip
    resumed.close()


def test_finite_epoch_pads_the_last_batch(processor, shapes):
    pipe = pipeline.InputPipeline(cfg(batch_size=6, num_epochs=1, shuffle=False), processor,
                                  source=shapes, process_index=0, process_count=1)  # fmt: skip
    batches = list(pipe)
    assert len(batches) == pipe.num_batches == 7  # ceil(40 / 6)
    ids = [r for b in batches for r in b.record_ids if r]
    assert ids == [records.as_text(shapes[i]["id"]) for i in range(40)]
    assert batches[-1].arrays["valid"].tolist() == [True] * 4 + [False] * 2
    assert not batches[-1].arrays["attention_mask"][4:].any()


def test_global_arrays_on_8_devices(processor, shapes):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), devices=jax.devices()[:8])
    kw = dict(source=shapes, process_index=0, process_count=1)
    pipe = pipeline.InputPipeline(cfg(batch_size=8), processor, **kw)
    host_f32 = next(pipeline.InputPipeline(cfg(batch_size=8, pixels="float32"), processor, **kw))
    batch = next(pipe)
    arrays = pipe.global_arrays(batch, mesh)
    assert set(arrays) == set(pipeline.ARRAY_KEYS) | {"pixel_values"}
    for key, x in arrays.items():
        expected = batch.arrays[key] if key != "pixel_values" else host_f32.arrays[key]
        assert x.shape == expected.shape and x.dtype == expected.dtype
        assert x.sharding.spec[0] == ("data", "fsdp")
        assert len(x.addressable_shards) == 8
        assert x.addressable_shards[0].data.shape[0] == 1
        if key == "pixel_values":  # on-device normaliser vs the host's float32 encoder
            np.testing.assert_allclose(np.asarray(x), expected, atol=PIXEL_ATOL, err_msg=key)
        else:  # integers, booleans and boxes are copied, not computed
            np.testing.assert_array_equal(np.asarray(x), expected, err_msg=key)
    pipe.close()


_WORKER = textwrap.dedent(
    """
    import dataclasses, json, os, sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    import numpy as np
    from jax.experimental import multihost_utils
    sys.path.insert(0, sys.argv[5])
    from test_data_pipeline import cfg, make_processor
    from visionr1_jax.data import pipeline

    c = cfg(batch_size=8, num_epochs=1, name="synthetic_shapes", builder_config="mp",
            data_dir=sys.argv[3])
    pipe = pipeline.InputPipeline(c, make_processor())
    assert pipe.process_index == jax.process_index() and pipe.process_count == 2
    mesh = jax.make_mesh((8,), ("data",))
    ids, steps, valid = [], 0, 0
    for batch in pipe:
        if jax.process_index() == 1 and steps == 0:
            # Host 1 picked a longer prompt bucket and a wider ground truth (as without an
            # upper instance bound) this step: host 0 must follow.
            a = dict(batch.arrays)
            a["input_ids"] = np.pad(a["input_ids"], ((0, 0), (8, 0)), constant_values=batch.pad_id)
            a["attention_mask"] = np.pad(a["attention_mask"], ((0, 0), (8, 0)))
            a["gt_boxes"] = np.pad(a["gt_boxes"], ((0, 0), (0, 34), (0, 0)))
            for key in ("gt_classes", "gt_mask"):
                a[key] = np.pad(a[key], ((0, 0), (0, 34)))
            batch = dataclasses.replace(batch, arrays=a)
        t_local = batch.arrays["input_ids"].shape[1]
        arrays = pipe.global_arrays(batch, mesh)
        if steps == 0:
            ids_all = multihost_utils.process_allgather(arrays["input_ids"], tiled=True)
            mask_all = multihost_utils.process_allgather(arrays["attention_mask"], tiled=True)
            assert ids_all.shape == (8, 168), ids_all.shape
            # Each row ends with the same tokens whatever its host's padding.
            mine = slice(4 * jax.process_index(), 4 * jax.process_index() + 4)
            k = batch.arrays["attention_mask"].sum(1)
            for row, n in zip(range(mine.start, mine.stop), k):
                local_row = batch.arrays["input_ids"][row - mine.start]
                np.testing.assert_array_equal(ids_all[row, 168 - n:], local_row[t_local - n:])
                assert mask_all[row].sum() == n
            boxes_all = multihost_utils.process_allgather(arrays["gt_boxes"], tiled=True)
            gt_all = multihost_utils.process_allgather(arrays["gt_mask"], tiled=True)
            assert boxes_all.shape == (8, 64, 4) and gt_all.shape == (8, 64), gt_all.shape
            n_local = batch.arrays["gt_mask"].shape[1]
            np.testing.assert_array_equal(boxes_all[mine, :n_local], batch.arrays["gt_boxes"])
            np.testing.assert_array_equal(gt_all[mine, :n_local], batch.arrays["gt_mask"])
            assert not gt_all[mine, n_local:].any()
        assert arrays["valid"].shape == (8,)
        valid += int(multihost_utils.process_allgather(arrays["valid"], tiled=True).sum())
        ids += [r for r in batch.record_ids if r]
        steps += 1
    out = {"ids": ids, "steps": steps, "valid": valid}
    with open(os.path.join(sys.argv[4], f"host{jax.process_index()}.json"), "w") as f:
        json.dump(out, f)
    """
)


def test_two_processes_see_disjoint_shards_covering_the_split(
    tmp_path, tmp_path_factory, processor
):
    """Two hosts read disjoint rows covering the split, and together they assemble exactly
    the global batches of a one-process run: host p holds rows [4p, 4p + 4) of each."""
    src, data_dir = shapes_source(tmp_path_factory, "mp", num_train=21, num_validation=2)
    # The worker opens the dataset by name from data_dir, as a run does.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")  # fmt: skip
    tests_dir = os.path.dirname(__file__)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                f"127.0.0.1:{port}",
                str(i),
                data_dir,
                str(tmp_path),
                tests_dir,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    hosts = [json.loads((tmp_path / f"host{i}.json").read_text()) for i in range(2)]
    a, b = set(hosts[0]["ids"]), set(hosts[1]["ids"])
    assert not a & b
    assert a | b == {records.as_text(src["train"][i]["id"]) for i in range(21)}
    # One process, same config: its batches in order are the reference global batches.
    c = cfg(batch_size=8, num_epochs=1, name="synthetic_shapes", builder_config="mp",
            data_dir=data_dir)  # fmt: skip
    single = pipeline.InputPipeline(c, processor, process_index=0, process_count=1)
    order = [r for batch in single for r in batch.record_ids if r]
    assert len(order) == 21
    assert hosts[0]["ids"] == order[0:4] + order[8:12] + order[16:20]
    assert hosts[1]["ids"] == order[4:8] + order[12:16] + order[20:21]
    assert hosts[0]["steps"] == hosts[1]["steps"] == 3  # ceil(21 / 8), same on both hosts
    # The global arrays assembled from both hosts' rows hold every record once.
    assert hosts[0]["valid"] == hosts[1]["valid"] == 21


def test_device_prefetch_same_batches_and_state_of_the_consumed_position(processor, shapes):
    mesh = jax.make_mesh((8,), ("data",))
    kw = dict(source=shapes, process_index=0, process_count=1)
    direct = take(pipeline.InputPipeline(cfg(batch_size=8), processor, **kw), 6)
    batches = pipeline.DevicePrefetch(
        pipeline.InputPipeline(cfg(batch_size=8), processor, **kw), mesh, size=3
    )
    got = [next(batches) for _ in range(3)]
    state = batches.get_state()  # the thread has prefetched further; the state must not show it
    peeked = batches.peek()
    assert batches.peek() is peeked and batches.get_state() == state  # peeking takes nothing
    got += [next(batches) for _ in range(3)]
    assert got[3] is peeked
    batches.close()
    assert [b.host.record_ids for b in got] == [b.record_ids for b in direct]
    for b, d in zip(got, direct, strict=True):
        np.testing.assert_array_equal(np.asarray(b.arrays["gt_boxes"]), d.arrays["gt_boxes"])
        assert b.arrays["pixel_values"].shape == (8, 64, 1176)
    resumed = pipeline.InputPipeline(cfg(batch_size=8), processor, **kw)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 3), direct[3:])
    resumed.close()


def test_state_saved_with_a_checkpoint_directory(processor, shapes, tmp_path):
    kw = dict(source=shapes, process_index=0, process_count=1)
    pipe = pipeline.InputPipeline(cfg(), processor, **kw)
    take(pipe, 2)
    pipeline.save_state(tmp_path / "step_2", pipe)
    assert (tmp_path / "step_2" / "data" / "process_0-of-1.json").exists()
    expected = take(pipe, 2)
    pipe.close()
    resumed = pipeline.InputPipeline(cfg(), processor, **kw)
    pipeline.restore_state(tmp_path / "step_2", resumed)
    assert_same_batches(take(resumed, 2), expected)
    resumed.close()


def test_open_source_builds_the_synthetic_default_and_explains_missing_data(tmp_path):
    c = cfg(builder_config="grounding", data_dir=str(tmp_path), split="validation")
    source = pipeline.open_source(c)  # built on first use from its seed
    assert len(source) > 256  # one record per (image, shape category present), 256 images
    assert records.as_text(source[0]["task"]) == "grounding"
    c = cfg(name="coco_detection", builder_config="all", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tfds_cli build coco_detection --config all"):
        pipeline.open_source(c)
