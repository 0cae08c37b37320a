"""The demo's experiment over seeds (issue 26): Vision-R1 against SFT for the same compute.

Runs `make demo`'s job (`python -m visionr1_jax.main --config=configs/demo_cpu.py`) once per
seed, each in its own process and workdir (`--workdir/seed_N`, resumable: a finished seed is
read back), then reports each seed's rows, the paired difference Vision-R1 - SFT (same compute)
in mAP and AP75 with its mean and 95% t-interval over seeds (Student's t, n - 1 degrees of
freedom), in domain and out of domain, and writes them as the JSON record that `make demo`
prints beside its own seed (`--out`, default `configs/demo_cpu_seeds.json`).

`--sweep` is how the demo's learning rates were chosen: from one warm start per seed, the GRPO
stage and the same-compute SFT stage at each of `--rates` (run k trains GRPO at the k-th GRPO
rate and the SFT continuation at the k-th SFT rate), evaluated on the `validation` split (never
the evaluation split, `test`), printed per rate; the chosen rates go into configs/demo_cpu.py by
hand.

    .venv/bin/python benchmarks/demo_seeds.py                           # 5 seeds (~40 min)
    .venv/bin/python benchmarks/demo_seeds.py --sweep --seeds 0         # learning rates
    .venv/bin/python benchmarks/demo_seeds.py --smoke                   # does it still run?

`--smoke` (tests/test_bench_demo.py runs it) runs two seeds of the experiment at test size
(the tiny checkpoint, 2-step stages) and prints the same tables; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo_cpu.py")
METRICS = (("AP", "mAP"), ("AP50", "AP50"), ("AP75", "AP75"), ("matched_iou", "matched IoU"))
ROWS = (("start", "start"), ("sft", "+SFT"), ("sft_more", "+SFT (same compute)"),
        ("grpo", "+Vision-R1"))  # fmt: skip
DOMAINS = (("in_domain", "results"), ("out_of_domain", "results_ood"))

# Test-size overrides of --smoke: the experiment of tests/test_experiment.py, through flags.
SMOKE_FLAGS = (
    "--config.total_steps=2", "--config.progress=False", "--config.data.batch_size=2",
    "--config.grpo.num_generations=2", "--config.grpo.max_new_tokens=8",
    "--config.eval.max_new_tokens=8", "--config.eval.batches=1", "--config.checkpoint.every=1",
    "--config.metrics.render_every=0", "--config.experiment.sft_steps=2",
    "--config.experiment.sft_warmup_steps=0", "--config.experiment.sft_batch_size=2",
    "--config.experiment.examples=1", "--config.experiment.reference_results=",
    "--config.model.tiny=qwen2_5_vl_tiny",
)  # fmt: skip


def t_interval(values) -> dict[str, float]:
    """Mean and 95% Student-t interval of `values` (n >= 2), and n."""
    from scipy import stats  # optional: only the aggregation needs it

    x = np.asarray(values, np.float64)
    n = len(x)
    mean = float(x.mean())
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def command(workdir: str, seed: int, extra: list[str], smoke: bool) -> list[str]:
    cmd = [sys.executable, "-m", "visionr1_jax.main", f"--config={CONFIG}",
           f"--workdir={workdir}", f"--config.seed={seed}", *extra]  # fmt: skip
    return cmd + list(SMOKE_FLAGS) if smoke else cmd


def run_all(jobs: list[tuple[str, list[str]]], parallel: int) -> None:
    """Runs the commands, `parallel` at a time, each logging to `<workdir>.log`; a failure
    stops everything with its log's tail."""
    waiting, running = list(jobs), []
    while waiting or running:
        while waiting and len(running) < parallel:
            workdir, cmd = waiting.pop(0)
            log = open(workdir + ".log", "a")
            print(f"started: {' '.join(cmd[2:])}", flush=True)
            running.append((workdir, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)))
        time.sleep(1)
        for item in list(running):
            workdir, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                for _, other in running:
                    other.kill()
                with open(workdir + ".log") as f:
                    tail = f.read()[-3000:]
                raise SystemExit(f"{workdir} failed ({proc.returncode}):\n{tail}")
            print(f"finished: {workdir}", flush=True)


def aggregate(records: list[dict]) -> dict:
    """The committed record: per seed rows, per row and metric the mean and interval over seeds,
    and the paired difference grpo - sft_more per metric, in and out of domain."""
    out = {"seeds": [r["seed"] for r in records], "per_seed": records}
    for domain, key in DOMAINS:
        if not all(key in r for r in records):
            continue
        rows = {
            row: {m: t_interval([r[key][row][m] for r in records]) for m, _ in METRICS}
            for row, _ in ROWS
        }
        paired = {
            m: t_interval([r[key]["grpo"][m] - r[key]["sft_more"][m] for r in records])
            for m, _ in METRICS
        }
        out[domain] = {"seeds": out["seeds"], "rows": rows, "paired": paired}
    if all("grpo_reward" in r for r in records):
        first = [r["grpo_reward"]["first_fifth"] for r in records]
        last = [r["grpo_reward"]["last_fifth"] for r in records]
        out["grpo_reward"] = {
            "first_fifth": t_interval(first),
            "last_fifth": t_interval(last),
            "rise": t_interval(np.subtract(last, first)),
            # the seed spread: the standard deviation over seeds of each fifth's mean
            "seed_sd": float(max(np.std(first, ddof=1), np.std(last, ddof=1)))
            if len(records) > 1 else math.nan,
        }  # fmt: skip
    return out


def report(record: dict) -> str:
    """Markdown: each seed's rows, the intervals and the paired differences, per domain."""
    lines = []
    for domain, key in DOMAINS:
        if domain not in record:
            continue
        agg = record[domain]
        lines += [f"\n{domain.replace('_', ' ')} (COCO metrics in percent)\n"]
        lines += ["| seed | model | " + " | ".join(t for _, t in METRICS) + " |",
                  "|---|---|" + "---|" * len(METRICS)]  # fmt: skip
        for r in record["per_seed"]:
            for row, title in ROWS:
                cells = [f"{100 * r[key][row][m]:.2f}" for m, _ in METRICS]
                lines.append(f"| {r['seed']} | {title} | " + " | ".join(cells) + " |")
        n = len(record["seeds"])
        for row, title in ROWS:
            cells = [_ci(agg["rows"][row][m]) for m, _ in METRICS]
            lines.append(f"| mean, 95% CI ({n}) | {title} | " + " | ".join(cells) + " |")
        cells = [_ci(agg["paired"][m], sign=True) for m, _ in METRICS]
        lines.append(
            f"| paired ({n}) | Vision-R1 - SFT (same compute) | " + " | ".join(cells) + " |"
        )
    g = record.get("grpo_reward")
    if g:
        rises = ", ".join(
            f"{r['grpo_reward']['first_fifth']:.3f} -> {r['grpo_reward']['last_fifth']:.3f}"
            for r in record["per_seed"]
        )
        lines.append(
            f"\nGRPO reward/total, first fifth -> last fifth of the stage, per seed: {rises}; "
            f"rise {g['rise']['mean']:+.3f} [{g['rise']['lo']:+.3f}, {g['rise']['hi']:+.3f}] "
            f"(95% CI), seed spread (SD over seeds of a fifth's mean) {g['seed_sd']:.3f}"
        )
    return "\n".join(lines)


def _ci(stat: dict, sign: bool = False) -> str:
    f = "{:+.2f}" if sign else "{:.2f}"
    if not math.isfinite(stat["lo"]):
        return f.format(100 * stat["mean"])
    mean, lo, hi = (f.format(100 * stat[k]) for k in ("mean", "lo", "hi"))
    return f"{mean} [{lo}, {hi}]"


def seeds_main(args) -> dict:
    jobs = []
    for seed in args.seeds:
        workdir = os.path.join(args.workdir, f"seed_{seed}")
        if not os.path.exists(os.path.join(workdir, "results.json")):
            jobs.append((workdir, command(workdir, seed, args.flags, args.smoke)))
    run_all(jobs, args.parallel)
    records = []
    for seed in args.seeds:
        with open(os.path.join(args.workdir, f"seed_{seed}", "results.json")) as f:
            r = json.load(f)
        keep = ("seed", "plan", "results", "results_ood", "grpo_reward")
        records.append({k: r[k] for k in keep if k in r})
    record = aggregate(records)
    record["source"] = (
        "benchmarks/demo_seeds.py --seeds " + ",".join(map(str, args.seeds))
        + (" " + " ".join(args.flags) if args.flags else "")
    )  # fmt: skip
    print(report(record))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"written: {args.out}")
    return record


def sweep_main(args) -> None:
    """Per seed: the warm start once, then run k: GRPO at rates[k][0], SFT (same compute) at
    rates[k][1], all evaluated on the validation split."""
    rates = [tuple(float(v) for v in pair.split(":")) for pair in args.rates]
    common = ["--config.data.eval_split=validation", "--config.experiment.ood_builder_config=",
              "--config.experiment.reference_results=", *args.flags]  # fmt: skip
    for seed in args.seeds:
        base = os.path.join(args.workdir, f"sweep_seed_{seed}")
        jobs = []
        for k, (grpo_lr, sft_lr) in enumerate(rates):
            workdir = f"{base}_{k}"
            flags = [*common, f"--config.optim.learning_rate={grpo_lr}",
                     f"--config.experiment.sft_more_learning_rate={sft_lr}"]  # fmt: skip
            jobs.append((workdir, command(workdir, seed, flags, args.smoke)))
        # the warm start (and the start model's evaluation) once, shared by every run
        first_dir = jobs[0][0]
        if not os.path.exists(os.path.join(first_dir, "results.json")):
            run_all([jobs[0]], 1)
        for workdir, _ in jobs[1:]:
            for stage in ("start", "sft"):
                if not os.path.exists(os.path.join(workdir, stage)):
                    shutil.copytree(os.path.join(first_dir, stage), os.path.join(workdir, stage))
        run_all([j for j in jobs[1:] if not os.path.exists(os.path.join(j[0], "results.json"))],
                args.parallel)  # fmt: skip
        print(f"\nseed {seed}: validation split, COCO metrics in percent\n")
        print(
            "| GRPO lr | +Vision-R1 mAP / AP75 / IoU | SFT lr "
            "| +SFT (same compute) mAP / AP75 / IoU |"
        )
        print("|---|---|---|---|")
        for (workdir, _), (grpo_lr, sft_lr) in zip(jobs, rates, strict=True):
            with open(os.path.join(workdir, "results.json")) as f:
                res = json.load(f)["results"]
            cell = lambda m: " / ".join(f"{100 * m[k]:.2f}" for k in ("AP", "AP75", "matched_iou"))
            print(f"| {grpo_lr:g} | {cell(res['grpo'])} | {sft_lr:g} | {cell(res['sft_more'])} |")
        with open(os.path.join(first_dir, "results.json")) as f:
            warm = json.load(f)["results"]["sft"]
        print(
            "\nwarm start (+SFT): "
            + " / ".join(f"{100 * warm[k]:.2f}" for k in ("AP", "AP75", "matched_iou"))
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "demo_seeds"))
    p.add_argument("--out", default=os.path.join(ROOT, "configs", "demo_cpu_seeds.json"))
    p.add_argument("--parallel", type=int, default=1, help="seeds run at once")
    p.add_argument("--sweep", action="store_true", help="the learning-rate sweep (validation)")
    p.add_argument("--rates", nargs="+", default=["2e-4:2e-4", "5e-4:5e-4", "1e-3:1e-3"],
                   help="GRPO:SFT learning-rate pairs of the sweep")  # fmt: skip
    p.add_argument("--smoke", action="store_true")
    p.add_argument("flags", nargs="*", help="more --config.* flags for every run")
    args = p.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke:
        import tempfile

        args.workdir = tempfile.mkdtemp(prefix="demo_seeds_smoke_")
        args.seeds, args.out, args.rates, args.parallel = [0, 1], "", args.rates[:2], 2
    os.makedirs(args.workdir, exist_ok=True)
    if args.sweep:
        sweep_main(args)
    else:
        seeds_main(args)
    if args.smoke:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
