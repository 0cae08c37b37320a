"""The Cloud TPU workflow with every path on `gs://`, against a GCS emulator on 127.0.0.1.

A bucket (the session's emulator, `conftest.gcs`) holds a tiny Hugging Face checkpoint and a
prepared tfds dataset (ArrayRecord). Then, as a user on a pod would, with every path remote:

1. `python -m visionr1_jax.main` with `model.checkpoint`, `data.data_dir` and `--workdir` on
   `gs://` trains, is SIGKILLed after its first committed checkpoint, and the same command
   resumes it to the end: its final train state, data position, metrics lines and rollouts
   equal those of an uninterrupted run of the same config on local paths (bit for bit);
   `metrics.jsonl`, `rollouts.jsonl`, TensorBoard events and a rendering are in the bucket;
2. `model.init_from` reads the run's parameters from `gs://` (`checkpoint.load_params`);
3. `python -m visionr1_jax.evaluate` on the `gs://` run writes its results to the bucket;
4. `python -m visionr1_jax.tools.export --out=gs://...` writes a Hugging Face checkpoint to
   the bucket; copied to a local folder, transformers loads it with no missing weight and its
   logits equal the run's final policy's.

Nothing reaches an address other than the emulator's (no credentials, no network here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import launch
import numpy as np
import pytest
import test_checkpoint
from test_checkpoint import final_state, host_tree, state_on

from visionr1_jax import checkpoint, fs
from visionr1_jax.data import data_config, pipeline
from visionr1_jax.models import testing, tiny
from visionr1_jax.tools import export

STEPS = 4
OVERRIDES = {  # test_checkpoint's run, shorter, with renderings
    **test_checkpoint.OVERRIDES,
    "total_steps": STEPS,
    "log_rollouts": STEPS,
    "metrics.render_every": 2,
    "metrics.render_count": 1,
}
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def bucket(gcs, tmp_path_factory):
    """The bucket's checkpoint and dataset (and their local originals), the test config."""
    root = tmp_path_factory.mktemp("gcs_workflow")
    local_ckpt = tiny.write_tiny_checkpoint(
        str(root / "tiny"), "qwen2_5_vl_tiny", tokenizer="small", min_pixels=3136,
        max_pixels=112 * 112,
    )  # fmt: skip
    local_data = launch.write_dataset(root / "data")
    prefix = gcs.prefix("workflow")
    fs.copy_tree(local_ckpt, f"{prefix}/models/tiny")
    fs.copy_tree(local_data, f"{prefix}/tfds")
    # Each run copies the remote dataset into its own cache (ArrayRecord reads local files).
    os.environ["VISIONR1_DATA_CACHE"] = str(root / "data_cache")
    yield dict(
        prefix=prefix,
        ckpt=f"{prefix}/models/tiny",
        data_dir=f"{prefix}/tfds",
        local_ckpt=local_ckpt,
        local_data=local_data,
        config=launch.write_config(root),
        cache=str(root / "jax_cache"),
    )
    os.environ.pop("VISIONR1_DATA_CACHE", None)


def committed(workdir: str) -> list[int]:
    """The committed checkpoint steps of a remote workdir (GCS has no rename: orbax marks a
    finished step with `commit_success.txt`)."""
    d = fs.join(workdir, "checkpoints")
    if not fs.exists(d):
        return []
    return sorted(
        int(n)
        for n in fs.listdir(d)
        if n.isdigit() and fs.exists(fs.join(d, n, "commit_success.txt"))
    )


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = launch.environment(1)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=launch.ROOT, env=env, capture_output=True,
        text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc


def test_every_path_on_gcs_trains_resumes_evaluates_and_exports(bucket, tmp_path):
    b = bucket
    local_dir, run_dir = str(tmp_path / "local_run"), f"{b['prefix']}/run"
    logs = str(tmp_path / "logs")
    local = {"model.checkpoint": b["local_ckpt"], "data.data_dir": b["local_data"]}
    remote = {"model.checkpoint": b["ckpt"], "data.data_dir": b["data_dir"]}

    # The uninterrupted run on local paths; once it has compiled (its first checkpoint is
    # committed), the gs:// run starts and loads the programs from the shared cache.
    ref = launch.start(b["config"], local_dir, {**OVERRIDES, **local}, cache=b["cache"])
    ref.wait_for(lambda: launch.committed(local_dir), timeout=TIMEOUT_S)
    cut = launch.start(b["config"], run_dir, {**OVERRIDES, **remote}, cache=b["cache"], logdir=logs)
    cut.wait_for(lambda: committed(run_dir), timeout=TIMEOUT_S)
    cut.kill()
    saved = committed(run_dir)
    assert saved and max(saved) < STEPS, saved
    again = launch.start(
        b["config"], run_dir, {**OVERRIDES, **remote}, cache=b["cache"], logdir=logs
    )
    assert again.wait(TIMEOUT_S) == [0]
    assert ref.wait(TIMEOUT_S) == [0]
    assert f"resuming from checkpoint step {max(saved)}" in again.text(), again.text()[-3000:]
    assert committed(run_dir)[-1] == STEPS

    # Bit-identical to the uninterrupted local run: state, data position, metrics, rollouts.
    _, _, start = state_on(b["local_ckpt"], (1, 1, 1))
    got = final_state(run_dir, b["local_ckpt"], STEPS, like=start)
    want = final_state(local_dir, b["local_ckpt"], STEPS, like=start)
    for g, w in zip(host_tree(got), host_tree(want), strict=True):
        np.testing.assert_array_equal(g, w)
    data = f"checkpoints/{STEPS}/data/process_0-of-1.json"
    assert fs.read_bytes(fs.join(run_dir, data)) == fs.read_bytes(os.path.join(local_dir, data))
    got_rows = rows(fs.read_text(fs.join(run_dir, "metrics.jsonl")))
    want_rows = rows(fs.read_text(os.path.join(local_dir, "metrics.jsonl")))
    assert [m["step"] for m in got_rows] == list(range(STEPS))
    for g, w in zip(got_rows, want_rows, strict=True):
        for key in ("reward/total", "loss", "kl", "grad_norm", "completion/length"):
            assert g[key] == w[key], (g["step"], key, g[key], w[key])
    assert fs.read_text(fs.join(run_dir, "rollouts.jsonl")) == fs.read_text(
        os.path.join(local_dir, "rollouts.jsonl")
    )
    assert any(n.startswith("events.out") for n in fs.walk_files(fs.join(run_dir, "tensorboard")))
    assert fs.walk_files(fs.join(run_dir, "renderings")), "no rendering in the bucket"

    # model.init_from on gs://: the run's trained parameters.
    params, step = checkpoint.load_params(run_dir, None, start.params)
    assert step == STEPS
    for g, w in zip(jax.tree.leaves(params), jax.tree.leaves(got.params), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    # Evaluation of the gs:// run writes its results to the bucket.
    flags = [f"--config={b['config']}", f"--workdir={run_dir}"]
    flags += [f"--config.{k}={v}" for k, v in {**OVERRIDES, **remote}.items()]
    run_module("visionr1_jax.evaluate", *flags)
    result = fs.read_json(fs.join(run_dir, "eval", f"step_{STEPS}.json"))
    assert result["step"] == STEPS and "AP" in result["metrics"], result

    # Export to gs://; transformers loads a local copy with the run's final logits.
    out = f"{b['prefix']}/export"
    run_module("visionr1_jax.tools.export", f"--workdir={run_dir}", f"--out={out}")
    copy = str(tmp_path / "export")
    fs.copy_tree(out, copy)
    policy = export.restore_policy(run_dir, None).model
    batch = testing.prompt_batch(b["local_ckpt"])
    logits = testing.jit_forward()(
        policy, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
        batch["attention_mask"],
    )  # fmt: skip
    testing.assert_logits_close(logits, testing.hf_logits(copy, batch), batch["attention_mask"])


def test_a_dataset_the_run_builds_is_uploaded_then_copied_back(gcs, tmp_path, monkeypatch):
    """A `gs://` data_dir without the dataset: a single-process run builds synthetic_shapes
    locally and uploads it; a host with an empty cache then copies it from the bucket and
    reads the same records."""
    monkeypatch.setenv("VISIONR1_DATA_CACHE", str(tmp_path / "cache_a"))
    c = data_config()
    c.name, c.builder_config, c.data_dir = "synthetic_shapes", "localize", gcs.prefix("built")
    built = pipeline.open_source(c, "validation")
    uploaded = fs.walk_files(c.data_dir)
    assert "synthetic_shapes/localize/1.0.0/dataset_info.json" in uploaded, uploaded
    monkeypatch.setenv("VISIONR1_DATA_CACHE", str(tmp_path / "cache_b"))
    copied = pipeline.open_source(c, "validation", build_synthetic=False)
    assert len(copied) == len(built) > 0
    for i in (0, len(built) - 1):
        assert copied[i]["image"] == built[i]["image"] and copied[i]["id"] == built[i]["id"]
