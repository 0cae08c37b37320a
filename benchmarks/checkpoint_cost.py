"""What checkpointing costs the GRPO loop: the demo config saving after every step.

Three runs of `python -m visionr1_jax.main --config=configs/demo_cpu.py:experiment=False` (the
demo's plain GRPO job: tiny model, synthetic shapes, 4 prompts x G 4 x 48 tokens per step),
each its own process, one after the other on the same machine:

* `none`: no checkpoints (`checkpoint.every=0`, and the final save is the only one);
* `async`: a save after every step, orbax writing in a background thread
  (`checkpoint.async_save=True`, the default);
* `sync`: a save after every step, the loop waiting for each write to finish.

The loop reports the seconds a save blocked it as `time/checkpoint` on the next step's line
and each step's own time as `time/step` (data + rollout + reward + reference + update, saves
excluded). Per run: the median step time over the steps after the first `--warmup`, the
median and largest blocked time per save, and the mean of step + blocked time (what a step
costs the loop, saves included). A save blocks for as long as it takes to copy the arrays
off the devices (async) or to write everything (sync); the background write also competes
with the steps for the 2 cores, which shows as a longer step time in the `async` run.

`--smoke` (the test suite runs it: tests/test_bench_checkpoint.py) only checks that the three
runs still go and the table still prints: 2 steps per run, both counted, 1 prompt x G 2 x 4
tokens, on 8 training images built in a temporary directory.

    .venv/bin/python benchmarks/checkpoint_cost.py                 # 30 steps per run
    .venv/bin/python benchmarks/checkpoint_cost.py --steps 20
    .venv/bin/python benchmarks/checkpoint_cost.py --smoke         # does it still run?
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/demo_cpu.py:experiment=False"  # the demo's plain GRPO job

RUNS = {
    "none": {"checkpoint.every": 0},
    "async": {"checkpoint.every": 1, "checkpoint.async_save": True},
    "sync": {"checkpoint.every": 1, "checkpoint.async_save": False},
}


def smoke_overrides(data_dir: str) -> dict:
    """`--smoke`'s sizes: 1 prompt x G 2 x 4 tokens on 8 images (`synthetic_shapes/smoke`,
    the `detection` recipe), built under `data_dir`."""
    from visionr1_jax.data.builders import synthetic_shapes

    config = synthetic_shapes.ShapesConfig(name="smoke", num_train=8, num_validation=1)
    synthetic_shapes.SyntheticShapes(config=config, data_dir=data_dir).download_and_prepare()
    return {
        "data.data_dir": data_dir,
        "data.builder_config": "smoke",
        "data.batch_size": 1,
        "grpo.num_generations": 2,
        "grpo.max_new_tokens": 4,
    }


def run(name: str, steps: int, workdir: str, extra: dict | None = None) -> list[dict]:
    overrides = {
        "total_steps": steps,
        "progress": False,
        "metrics.render_every": 0,
        "checkpoint.keep": 3,
        **RUNS[name],
        **(extra or {}),
    }
    cmd = [
        sys.executable, "-m", "visionr1_jax.main", f"--config={CONFIG}",
        f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} run failed:\n{out.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    if len(rows) != steps:
        raise RuntimeError(f"{name} run wrote {len(rows)} metrics rows, not {steps}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--smoke", action="store_true", help="does it still run: 2 steps per run, tiny sizes"
    )
    args = parser.parse_args()
    tmp, extra = None, {}
    if args.smoke:
        args.steps, args.warmup = 2, 0
        tmp = tempfile.TemporaryDirectory()
        extra = smoke_overrides(os.path.join(tmp.name, "tfds"))
    print(f"demo config, {args.steps} steps per run, first {args.warmup} not counted\n")
    print("| run | saves | median step (s) | median blocked per save (s) | max blocked (s) "
          "| step + blocked (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in RUNS:
        with tempfile.TemporaryDirectory() as workdir:
            rows = run(name, args.steps, workdir, extra)
        rows = rows[args.warmup :]
        step = np.median([r["time/step"] for r in rows])
        blocked = [r["time/checkpoint"] for r in rows if r.get("time/checkpoint") is not None]
        per = np.mean([r["time/step"] + (r.get("time/checkpoint") or 0.0) for r in rows])
        if blocked:
            cells = f"{np.median(blocked):.3f} | {np.max(blocked):.3f}"
        else:
            cells = "– | –"
        print(f"| {name} | {len(blocked)} | {step:.3f} | {cells} | {per:.3f} |", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
