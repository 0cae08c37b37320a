"""A run's metrics files in its workdir itself, local or `gs://` (issue 29, point 1), against
the session's GCS emulator on 127.0.0.1 (`conftest.gcs`):

- a `metrics.Writer` on `gs://bucket/...` writes `metrics.jsonl`, TensorBoard events and a
  rendering PNG to the bucket: nothing of the JSON lines is uploaded between flushes, every
  row is after `flush()` (the loop's point before a checkpoint save) and after `close()`;
- TensorBoard's own reader (`EventAccumulator`) reads the scalars and images back, from the
  bucket directly and from a downloaded copy; a resumed writer (`purge_step`) hides the
  redone steps of the first one, locally and on `gs://`; a remote event file past
  `ROTATE_BYTES` is finished and a new one started, and no event is lost;
- `truncate_jsonl` (a torn last line included) and `rollout.write_rollout` on `gs://`;
- `make tensorboard`'s command, as `make -n` prints it, serves a local and a `gs://` run's
  scalars (TensorBoard's HTTP API, on localhost).

The whole training loop on a `gs://` workdir (kill and resume included) is
tests/test_gcs_workflow.py.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from visionr1_jax import fs, metrics, rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE_TIMEOUT_S = 90


def _tb(logdir: str) -> EventAccumulator:
    """TensorBoard's reader of `logdir` (local or gs://, its fsspec file system), loaded."""
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def test_writer_on_a_gs_workdir_writes_its_files_to_the_bucket(gcs, tmp_path):
    root = gcs.prefix("writer")
    writer = metrics.Writer(root, tensorboard=True)
    writer.jsonl._file.flush_secs = 1e9  # no time-based upload: only flush() and close()
    writer.tb.flush_secs = 1e9
    rows = [{"loss": 1.5, "kl": float("nan")}, {"loss": 0.25, "kl": 0.125}]
    writer.write(0, rows[0])
    image = _image(0)
    paths = writer.images(0, {"rollout/0": image})
    writer.write(1, rows[1])
    assert not fs.exists(fs.join(root, "metrics.jsonl"))  # not uploaded before a flush

    writer.flush()  # what the loop does before each checkpoint save
    want = [{"step": 0, "loss": 1.5, "kl": None}, {"step": 1, "loss": 0.25, "kl": 0.125}]
    assert metrics.read_jsonl(fs.join(root, "metrics.jsonl")) == want
    assert _scalars(_tb(fs.join(root, "tensorboard")), "loss") == {0: 1.5, 1: 0.25}

    writer.write(2, {"loss": 0.5, "kl": 0.0})
    writer.close()
    want.append({"step": 2, "loss": 0.5, "kl": 0.0})
    assert metrics.read_jsonl(fs.join(root, "metrics.jsonl")) == want
    assert paths == [fs.join(root, "renderings", "step_0", "rollout_0.png")]
    png = np.asarray(Image.open(io.BytesIO(fs.read_bytes(paths[0]))))
    np.testing.assert_array_equal(png, image)
    assert sorted(fs.walk_files(root))[:2] == ["metrics.jsonl", "renderings/step_0/rollout_0.png"]

    # TensorBoard reads the bucket itself and a downloaded copy alike
    local = tmp_path / "copy"
    fs.copy_tree(fs.join(root, "tensorboard"), str(local))
    for logdir in (fs.join(root, "tensorboard"), str(local)):
        acc = _tb(logdir)
        assert _scalars(acc, "loss") == {0: 1.5, 1: 0.25, 2: 0.5}
        assert _scalars(acc, "kl") == {1: 0.125, 2: 0.0}  # NaN is not a TensorBoard scalar
        (event,) = acc.Images("rollout/0")
        assert event.step == 0
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(event.encoded_image_string))), image
        )


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_resumed_tensorboard_writer_hides_the_redone_steps(gcs, tmp_path, where):
    """A run killed after step 4 and resumed from its checkpoint at step 2: TensorBoard shows
    steps 0-1 of the first run and 2-3 of the resumed one, never the first run's 2-4."""
    workdir = str(tmp_path) if where == "local" else gcs.prefix("resume")
    first = metrics.TensorBoardWriter(workdir)
    for step in range(5):
        first.scalars(step, {"loss": float(step)})
    first.close()
    resumed = metrics.TensorBoardWriter(workdir, purge_step=2)
    for step in (2, 3):
        resumed.scalars(step, {"loss": 10.0 + step})
    resumed.close()
    assert len(fs.listdir(fs.join(workdir, "tensorboard"))) == 2
    assert _scalars(_tb(fs.join(workdir, "tensorboard")), "loss") == {
        0: 0.0, 1: 1.0, 2: 12.0, 3: 13.0
    }  # fmt: skip


def test_a_remote_event_file_past_the_bound_is_rotated(gcs, monkeypatch):
    monkeypatch.setattr(metrics, "ROTATE_BYTES", 2000)
    root = gcs.prefix("rotate")
    writer = metrics.TensorBoardWriter(root, flush_secs=0.0)  # uploads after every call
    for step in range(120):
        writer.scalars(step, {"a": float(step), "b": -float(step)})
    writer.close()
    files = fs.listdir(fs.join(root, "tensorboard"))
    assert len(files) >= 3, files
    for name in files[:-1]:  # each finished file stopped soon after the bound
        assert 2000 <= len(fs.read_bytes(fs.join(root, "tensorboard", name))) < 2400, name
    acc = _tb(fs.join(root, "tensorboard"))
    assert _scalars(acc, "a") == {s: float(s) for s in range(120)}
    assert _scalars(acc, "b") == {s: -float(s) for s in range(120)}


def test_truncate_jsonl_and_write_rollout_on_gs(gcs):
    root = gcs.prefix("jsonl")
    path = fs.join(root, "metrics.jsonl")
    assert metrics.truncate_jsonl(path, 3) == 0  # no file yet: nothing to do
    lines = [f'{{"step": {s}, "loss": {s / 2}}}' for s in range(5)]
    fs.write_text(path, "\n".join(lines) + '\n{"step": 5, "lo')  # the last line torn by a kill
    assert metrics.truncate_jsonl(path, 3) == 3
    assert fs.read_text(path) == "\n".join(lines[:3]) + "\n"  # kept lines byte for byte
    assert metrics.read_jsonl(path) == [{"step": s, "loss": s / 2} for s in range(3)]

    tokens = np.array([[5, 6, 7], [8, 9, 0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]], bool)
    rollout.write_rollout(root, 0, tokens, mask, np.array([0.5, 1.0]))
    rollout.write_rollout(root, 1, tokens[::-1], mask[::-1], np.array([1.0, 0.5]))
    got = metrics.read_jsonl(fs.join(root, "rollouts.jsonl"))
    assert got == [
        {"step": 0, "tokens": [[5, 6, 7], [8, 9]], "rewards": [0.5, 1.0]},
        {"step": 1, "tokens": [[8, 9], [5, 6, 7]], "rewards": [1.0, 0.5]},
    ]
    assert metrics.truncate_jsonl(fs.join(root, "rollouts.jsonl"), 1) == 1


@pytest.mark.parametrize("where", ["local", "gs"])
def test_make_tensorboard_serves_a_runs_scalars(gcs, tmp_path, where):
    workdir = str(tmp_path / "run") if where == "local" else gcs.prefix("serve")
    writer = metrics.Writer(workdir)
    for step in range(3):
        writer.write(step, {"loss": step / 4})
    writer.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = subprocess.run(
        ["make", "-n", "tensorboard", f"WORKDIR={workdir}", f"TB_PORT={port}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.replace("\\\n", " ")  # fmt: skip
    (command,) = [line for line in recipe.splitlines() if "tensorboard --logdir" in line]
    log = open(tmp_path / "tensorboard.log", "w")
    proc = subprocess.Popen(shlex.split(command), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}/data/plugin/scalars/scalars?run=tensorboard&tag=loss"
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:
            try:
                got = json.loads(urllib.request.urlopen(url, timeout=5).read())
                if len(got) == 3:
                    break
            except OSError:  # not listening yet, or the run not loaded yet (404)
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "tensorboard.log"
            ).read_text()[-3000:]
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert [(step, value) for _, step, value in got] == [(0, 0.0), (1, 0.25), (2, 0.5)]
