"""`python -m visionr1_jax.tools.export`: a run checkpoint as a Hugging Face checkpoint.

One short GRPO run of the tiny model (the demo config: its start checkpoint written to the
workdir, the vision tower frozen so the export has to take those parameters from the start
checkpoint) saves at steps 1 and 2; the newest checkpoint is exported, and

- transformers loads every weight of it (no missing or unexpected key) and its float32 logits
  on a prompt batch with images equal those of the run's own final policy (the in-memory
  model, not one rebuilt by the export) within the model-parity tolerance of
  `models.testing`; our loader reads back exactly the run's final parameters;
- the trained weights differ from the start checkpoint's (an export of the start weights would
  fail) and the frozen tower's are the start checkpoint's;
- the processor files travel along; the command line's bf16 export of step 1 loads as bf16;
  a missing step, an empty workdir and an unknown dtype are errors that say what is there;
- a save in flight in the workdir (a run still training) is left alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx
from test_checkpoint import ROOT, run_config
from test_train_loop import data_dir  # noqa: F401  (a fixture of this module too)

from visionr1_jax import checkpoint, loading, processing, rollout, train
from visionr1_jax.models import hf_weights, testing
from visionr1_jax.tools import export


def _flat(model) -> dict[str, np.ndarray]:
    return {
        hf_weights.hf_key(p): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _hf_model(path: str, **kwargs):
    """transformers' class for the checkpoint's `model_type` and its loading report."""
    import json

    import transformers

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        family = json.load(f)["model_type"]
    cls = {
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    }[family]
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    return model.eval(), info


def _length_reward(reward_config):
    """A reward that differs within a group (the completions' lengths), so the updates move the
    trained weights; the Vision-R1 reward of a random model is 0 for every completion."""

    def score(host_batch, completions, step):
        terms = rollout.score_rows(host_batch, completions, reward_config, step)
        lengths = np.asarray([len(text) for text in completions], np.float32)
        terms["reward/total"] = lengths / max(lengths.max(), 1.0) * terms["valid"]
        return terms

    return score


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):  # noqa: F811  (the fixture)
    """A 2-step run (checkpoints at 1 and 2) and its final policy's parameters and logits."""
    workdir = str(tmp_path_factory.mktemp("export_run"))
    config = run_config("", data_dir, total_steps=2)
    config.model.freeze_vision_tower = True
    config.grpo.beta = 0.0  # no reference pass to compile: the export never reads it
    if config.get("metrics") is not None:
        config.metrics.render_every = 0  # no renderings: not what this test is about
    job = train.setup(config, workdir)
    job.programs.score_fn = _length_reward(config.reward)
    train.train_loop(job)
    policy = job.policy
    start = loading.checkpoint_path(config, workdir)
    batch = testing.prompt_batch(start)
    logits = testing.jit_forward()(
        policy, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
        batch["attention_mask"],
    )  # fmt: skip
    return dict(
        workdir=workdir, start=start, params=_flat(policy), batch=batch, logits=np.asarray(logits)
    )


def test_export_loads_in_transformers_with_our_logits(trained, tmp_path):
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    out = export.export(trained["workdir"], None, str(tmp_path / "hf"))
    hf, info = _hf_model(out, dtype=torch.float32)
    assert not any(info.values()), info  # a missing weight would be initialised at random
    batch = trained["batch"]
    ref = testing.hf_logits(out, batch, hf_model=hf)
    testing.assert_logits_close(trained["logits"], ref, batch["attention_mask"])

    # Our loader reads the export back as the run's final parameters, bit for bit (float32).
    again = _flat(hf_weights.from_pretrained(out))
    params = trained["params"]
    assert again.keys() == params.keys()
    for key, value in params.items():
        np.testing.assert_array_equal(again[key], value, key)

    # Training moved the trained weights; the frozen tower is the start checkpoint's.
    start = _flat(hf_weights.from_pretrained(trained["start"]))
    moved = {k for k in params if not np.array_equal(params[k], start[k])}
    assert moved and all(not k.startswith("visual.") for k in moved), sorted(moved)
    assert {k for k in params if not k.startswith("visual.")} == moved

    # The processor files: the same tokenizer and image processor as the start checkpoint's.
    # (`AutoProcessor` would build the stock processor, whose video part needs torchvision.)
    assert type(AutoImageProcessor.from_pretrained(out)).__name__.startswith("Qwen2VLImage")
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|image_pad|>") == (
        hf.config.image_token_id
    )
    proc, want = processing.load_processor(out), processing.load_processor(trained["start"])
    text = processing.render_prompt(proc, "Find the red square please.", num_images=1)
    assert proc.tokenizer(text)["input_ids"] == want.tokenizer(text)["input_ids"]
    assert proc.image_processor.to_dict() == want.image_processor.to_dict()


def test_bf16_export_and_the_command_line(trained, tmp_path):
    """`python -m visionr1_jax.tools.export --dtype=bfloat16 --step=1`: transformers reads
    bf16 weights, the step-1 parameters rounded to bf16."""
    import torch

    out = str(tmp_path / "hf_bf16")
    cmd = [
        sys.executable, "-m", "visionr1_jax.tools.export", f"--workdir={trained['workdir']}",
        "--step=1", f"--out={out}", "--dtype=bfloat16",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    hf, info = _hf_model(out)
    assert not any(info.values()), info
    assert hf.dtype == torch.bfloat16
    # The bf16 file holds the step-1 parameters rounded to bf16 (our loader upcasts them).
    step1 = export.restore_policy(trained["workdir"], 1)
    assert step1.step == 1
    params = _flat(step1.model)
    assert any(not np.array_equal(v, trained["params"][k]) for k, v in params.items())
    again = _flat(hf_weights.from_pretrained(out))
    for key, value in params.items():
        want = value.astype(np.dtype("bfloat16")).astype(np.float32)
        np.testing.assert_array_equal(again[key], want, key)


def test_errors_name_what_is_there(trained, tmp_path):
    with pytest.raises(ValueError, match=r"no checkpoint of step 7 .*saved: \[1, 2\]"):
        export.export(trained["workdir"], 7, str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        export.export(str(tmp_path), None, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="dtype='int8'"):
        export.export(trained["workdir"], None, str(tmp_path / "x"), dtype="int8")
    assert not os.path.exists(tmp_path / "x")
    assert checkpoint.checkpoint_steps(trained["workdir"]) == [1, 2]


def test_a_save_in_flight_is_left_alone(trained):
    """Exporting from the workdir of a run that is still training: the checkpoints are read
    without touching the step directory orbax is writing (a read-write manager that cleans up
    temporary directories, as `checkpoint.Checkpointer` opens one, removes it on opening)."""
    import orbax.checkpoint as ocp

    directory = os.path.join(trained["workdir"], "checkpoints")
    in_flight = os.path.join(directory, "3.orbax-checkpoint-tmp-17")
    os.makedirs(in_flight)
    try:
        assert export.restore_policy(trained["workdir"]).step == 2
        assert os.path.isdir(in_flight)
        # What the export must not do (and proof that orbax takes the directory for a save
        # in flight):
        options = ocp.CheckpointManagerOptions(cleanup_tmp_directories=True, create=False)
        ocp.CheckpointManager(directory, options=options).close()
        deadline = time.monotonic() + 60  # orbax may remove it from a background thread
        while os.path.exists(in_flight) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(in_flight)
    finally:
        if os.path.isdir(in_flight):
            os.rmdir(in_flight)
