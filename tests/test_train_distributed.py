"""The GRPO loop of `python -m visionr1_jax.main` does not depend on how it is laid out: on a
(2, 2, 2) mesh of 8 CPU devices, and as a 2-process `jax.distributed` run (2 x 4 CPU devices
on localhost), it reproduces the 1-device run's first rollouts token for token and their
rewards (issue 10, acceptance 4), and its end-of-run evaluation (issue 12: greedy answers
decoded where the rows live, gathered to process 0) gives the same answers and metrics.

Every run is a real `main` subprocess (the device count is fixed before jax is imported) on the
same tiny checkpoint and the same `synthetic_shapes` records; all are launched at once so the
compilations share the cores. Two rollouts are compared: the second is sampled from the policy
after the first update (lr 1e-3), so reproducing it shows the update matched too.

All runs read the same 8 shuffled prompts per step: the input pipeline lays one global order
over the hosts (host p holds rows [p·b, (p+1)·b) of each global batch), so the 2-process
global batch is the 1-process batch, row for row.
"""

from __future__ import annotations

import glob
import json
import os

import launch
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from visionr1_jax import processing
from visionr1_jax.metrics import read_jsonl
from visionr1_jax.models import tiny

STEPS = 2  # rollouts compared: the first, and the one after the first update
TIMEOUT_S = 1200  # all runs together (~9 minutes measured on a 2-core machine under load 10)

# `main` runs configs/demo_cpu.py with these overrides (and a mesh, a batch size per run).
OVERRIDES = {
    "total_steps": STEPS,
    "log_rollouts": STEPS,
    "progress": False,
    "grpo.num_generations": 4,
    "grpo.max_new_tokens": 8,
    "optim.learning_rate": 1e-3,  # the update moves step 2's sampling distribution (kl > 0)
    "data.builder_config": "loop",
    "eval.every": STEPS,  # a greedy evaluation at the end, gathered from every host
    "eval.max_new_tokens": 8,
}
# name: (processes, devices per process, ici mesh, prompts per step B)
RUNS = {
    "one": (1, 1, (1, 1, 1), 8),
    "mesh": (1, 8, (2, 2, 2), 8),
    "procs": (2, 4, (2, 2, 2), 8),  # data and fsdp across the processes
}


def digit_writer_checkpoint(path: str) -> str:
    """The tiny checkpoint, edited so that completions are mostly ASCII digits: a digit string
    (without a leading 0) is a JSON number and passes the official format check, so the random
    model's rewards vary within groups and the first update is driven by them.

    A constant vector u joins the last layer's residual stream at every position (through the
    value bias: attention weights sum to 1, so `o_proj(bias)` is added whatever they are), and
    the lm_head rows of the digit tokens and `<|im_end|>` gain a component along u: a logit
    bonus of a few units everywhere; all logits still depend on the prompt and the image.
    """
    tiny.write_tiny_checkpoint(
        path, "qwen2_5_vl_tiny", tokenizer="small", min_pixels=3136, max_pixels=112 * 112
    )
    (file,) = glob.glob(os.path.join(path, "*.safetensors"))
    w = load_file(file)
    bias = np.random.default_rng(0).normal(size=32).astype(np.float32) * 1.5  # 2 kv heads x 16
    w["model.layers.1.self_attn.v_proj.bias"] += bias
    heads = np.repeat(bias.reshape(2, 16), 2, axis=0).reshape(-1)  # 4 query heads share 2
    u = w["model.layers.1.self_attn.o_proj.weight"] @ heads
    vocab = processing.load_processor(path).tokenizer.get_vocab()
    ids = [i for t, i in vocab.items() if t.isascii() and t.isdigit()] + [vocab["<|im_end|>"]]
    w["lm_head.weight"][ids] += 0.8 * u / np.linalg.norm(u)
    save_file(w, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 16-record `synthetic_shapes` dataset, the shared checkpoint and the config."""
    data_dir = launch.write_dataset(tmp_path_factory.mktemp("data"))
    root = tmp_path_factory.mktemp("assets")
    checkpoint = digit_writer_checkpoint(str(root / "checkpoint"))
    return {"data_dir": data_dir, "checkpoint": checkpoint, "config": launch.write_config(root)}


def start(assets, workdir: str, processes: int, devices: int, mesh, batch: int) -> launch.Run:
    """Starts the `processes` of one `main` run."""
    overrides = {
        **OVERRIDES,
        "model.checkpoint": assets["checkpoint"],
        "data.data_dir": assets["data_dir"],
        "data.batch_size": batch,
        "mesh.ici_parallelism": "({},{},{})".format(*mesh),
    }
    return launch.start(assets["config"], workdir, overrides, processes, devices)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Launches every run at once and waits for all; a failed run stops the others and fails
    with the log tails of each of its processes."""
    base = tmp_path_factory.mktemp("runs")
    started = {name: start(assets, str(base / name), *spec) for name, spec in RUNS.items()}
    launch.wait_all(started, TIMEOUT_S)
    return {name: str(base / name) for name in RUNS}


def rollouts(workdir: str) -> list[dict]:
    return read_jsonl(os.path.join(workdir, "rollouts.jsonl"))


def assert_same_rollouts(got: list[dict], want: list[dict], name: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(STEPS)), name
    for g, w in zip(got, want, strict=True):
        assert len(g["tokens"]) == len(w["tokens"]), name
        diff = [i for i, (a, b) in enumerate(zip(g["tokens"], w["tokens"], strict=True)) if a != b]
        assert not diff, f"{name}: step {w['step']} rows {diff} differ; first: " + str(
            (g["tokens"][diff[0]], w["tokens"][diff[0]])
        )
        # Rewards exactly: the same jitted reward program of the same completions and records.
        diff = [
            i for i, (a, b) in enumerate(zip(g["rewards"], w["rewards"], strict=True)) if a != b
        ]
        assert not diff, f"{name}: step {w['step']} rewards of rows {diff} differ: " + str(
            ([g["rewards"][i] for i in diff], [w["rewards"][i] for i in diff])
        )


@pytest.mark.parametrize(("name", "reference"), [("mesh", "one"), ("procs", "one")])
def test_rollouts_and_rewards_equal_the_1_device_run(runs, name, reference):
    want = rollouts(runs[reference])
    # Preconditions: the first update is driven by rewards that vary within a group; it moved
    # the policy (KL to the reference at the second step > 1e-3; ~1e-13 before any update);
    # the groups' rewards differ, so rows scored for the wrong prompt would show.
    g = OVERRIDES["grpo.num_generations"]
    groups = [np.asarray(r["rewards"]).reshape(-1, g) for r in want]
    assert (groups[0].std(1) > 0).any(), groups[0]
    assert any(len({tuple(x) for x in step}) > 1 for step in groups), groups
    metrics = read_jsonl(os.path.join(runs[reference], "metrics.jsonl"))
    assert metrics[1]["kl"] > 1e-3, metrics[1]["kl"]
    assert_same_rollouts(rollouts(runs[name]), want, f"{name} vs {reference}")


@pytest.mark.parametrize("name", list(RUNS))
def test_one_metrics_line_per_step_from_process_0(runs, name):
    """Every process of a run shares the workdir; only process 0 writes metrics and rollouts."""
    files = sorted(os.listdir(runs[name]))
    assert [f for f in files if f.endswith(".jsonl")] == ["metrics.jsonl", "rollouts.jsonl"]
    assert [m["step"] for m in read_jsonl(os.path.join(runs[name], "metrics.jsonl"))] == [0, 1]
    assert len(rollouts(runs[name])) == STEPS


@pytest.mark.parametrize("name", ["mesh", "procs"])
def test_evaluation_equals_the_1_device_run(runs, name):
    """The evaluation after the last step: the same greedy answers, in the same order, with
    the same boxes and scores, and the same metrics, whether the rows were decoded on one
    device, over 8, or by 2 processes (host 0 gathering host 1's answers)."""

    def read(run):
        directory = os.path.join(runs[run], "eval")
        record = json.loads(open(os.path.join(directory, f"step_{STEPS}.json")).read())
        lines = open(os.path.join(directory, f"step_{STEPS}_predictions.jsonl")).readlines()
        return record["metrics"], [json.loads(x) for x in lines]

    want_metrics, want = read("one")
    got_metrics, got = read(name)
    assert want_metrics["num_examples"] == len(want) == 2  # the validation split
    assert [a["record_id"] for a in got] == [a["record_id"] for a in want]
    assert [a["completion"] for a in got] == [a["completion"] for a in want]
    assert [a["scores"] for a in got] == [a["scores"] for a in want]
    assert got_metrics == want_metrics
    rows = read_jsonl(os.path.join(runs[name], "metrics.jsonl"))
    assert rows[-1]["eval/num_examples"] == 2 and "eval/AP" not in rows[0]
