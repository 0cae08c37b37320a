"""`make demo`'s training speed before and after issue 26, side by side on one commit.

"before" is configs/demo_cpu.py as it was before issue 26 (the 384-token byte-level `small`
tokenizer, `synthetic_shapes/localize`: one circle per image, prompts padded to 160 tokens,
48 new tokens); "after" is configs/demo_cpu.py as committed (the `demo` tokenizer and data).
Same code, same model class, sampler, reward, loss and loop; each side runs the experiment's
own stage configs (`experiment.sft_stage`, `experiment.grpo_stage`) in its own process: an SFT
warm start of `--sft-steps` steps (so that GRPO's completions end where a trained model ends
them, not at the token budget), then `--grpo-steps` GRPO steps from it. The sides alternate
(A B A B ...) `--repeats` times so that the machine's drift hits both alike. Reported: the
median seconds per step (each run's first step, which compiles, left out), SFT prompts per
second (prompts per step / median step) and GRPO completions per second (B x G / median
step), each side's median over repeats, and the ratios after / before.

    .venv/bin/python benchmarks/demo_speed.py                 # 2 repeats (~10 min, 2 cores)
    .venv/bin/python benchmarks/demo_speed.py --smoke         # does it still run?
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


def before(c):
    """configs/demo_cpu.py as it was before issue 26 (commit 770c95f), on today's code."""
    c.model.tokenizer = "small"
    c.data.builder_config = "localize"
    c.data.eval_split = "validation"
    c.data.max_prompt_len = 160
    c.data.max_instances = 1
    c.data.batch_size = 8
    c.grpo.max_new_tokens = 48
    c.eval.max_new_tokens = 48
    c.experiment.sft_batch_size = 16
    c.experiment.ood_builder_config = ""
    return c


def child(side: str, workdir: str, sft_steps: int, grpo_steps: int, smoke: bool) -> dict:
    """One side: warm start, then GRPO; returns its step times and batch shapes."""
    sys.path.insert(0, ROOT)
    from configs import demo_cpu
    from visionr1_jax import experiment, train
    from visionr1_jax import metrics as metrics_lib

    c = demo_cpu.get_config()
    if side == "before":
        c = before(c)
    c.progress = False
    c.metrics.render_every = 0
    c.experiment.reference_results = ""
    if smoke:
        c.model.tiny = "qwen2_5_vl_tiny"
    sft_dir, grpo_dir = os.path.join(workdir, "sft"), os.path.join(workdir, "grpo")
    s = experiment.sft_stage(c, sft_steps)
    s.checkpoint.every = sft_steps
    train.run(s, sft_dir)
    g = experiment.grpo_stage(c, init_from=sft_dir)
    g.total_steps = grpo_steps
    g.checkpoint.every = grpo_steps
    train.run(g, grpo_dir)
    times = lambda d: [m["time/step"] for m in metrics_lib.read_jsonl(f"{d}/metrics.jsonl")]
    grpo_rows = metrics_lib.read_jsonl(f"{grpo_dir}/metrics.jsonl")
    return {
        "sft": times(sft_dir)[1:],
        "grpo": times(grpo_dir)[1:],
        "sft_prompts": int(s.data.batch_size),
        "grpo_completions": int(g.data.batch_size) * int(g.grpo.num_generations),
        "completion_len": float(np.mean([m.get("completion/length", np.nan) for m in grpo_rows])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sft-steps", type=int, default=120)
    p.add_argument("--grpo-steps", type=int, default=16)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "WORKDIR"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.smoke:
        a.repeats, a.sft_steps, a.grpo_steps = 1, 3, 3
    if a.child:
        out = child(*a.child, a.sft_steps, a.grpo_steps, a.smoke)
        print("RESULT " + json.dumps(out))
        return
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="demo_speed_") as tmp:
        for r in range(a.repeats):
            for side in ("before", "after"):
                cmd = [sys.executable, __file__, "--child", side, f"{tmp}/{side}_{r}",
                       f"--sft-steps={a.sft_steps}", f"--grpo-steps={a.grpo_steps}"]  # fmt: skip
                cmd += ["--smoke"] if a.smoke else []
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(
                        f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
                    )
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
                runs[side].append(json.loads(line[len("RESULT ") :]))
                print(f"round {r + 1} {side}: done", flush=True)
    rate = {}
    print("\n| side | SFT s/step (median per run) | SFT prompts/s | GRPO s/step (median per run) "
          "| GRPO completions/s | mean completion tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for side, rs in runs.items():
        sft = [float(np.median(x["sft"])) for x in rs]
        grpo = [float(np.median(x["grpo"])) for x in rs]
        rate[side] = (rs[0]["sft_prompts"] / np.median(sft),
                      rs[0]["grpo_completions"] / np.median(grpo))  # fmt: skip
        print(f"| {side} | {' / '.join(f'{v:.3f}' for v in sft)} | {rate[side][0]:.1f} "
              f"| {' / '.join(f'{v:.3f}' for v in grpo)} | {rate[side][1]:.1f} "
              f"| {np.mean([x['completion_len'] for x in rs]):.1f} |")  # fmt: skip
    print(
        f"| after / before | | {rate['after'][0] / rate['before'][0]:.2f}x | "
        f"| {rate['after'][1] / rate['before'][1]:.2f}x | |"
    )


if __name__ == "__main__":
    main()
