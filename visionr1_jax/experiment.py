"""The paper's experiment in miniature (`make demo`): base → +SFT → +Vision-R1 against
+SFT for the same compute, evaluated alike, printed as the paper's Table 1.

`run(config, workdir)` (what `python -m visionr1_jax.main` runs when the config has an
`experiment` section, `configs/demo_cpu.py`) runs these stages, each in its own directory
under `workdir`, each resumable (a killed demo started again skips what is done and resumes
the stage it was in from its last checkpoint):

1. `start`: evaluate the initial checkpoint (`eval` section: greedy answers on the
   evaluation split, COCO metrics).
2. `sft`: supervised warm start from it (`experiment.sft_steps` at
   `experiment.sft_learning_rate`), then evaluate.
3. `grpo`: Vision-R1 GRPO from the warm start (`model.init_from`; the warm start is also the
   reference model): the config itself (`total_steps`, `grpo`, `reward`, `optim`), then
   evaluate.
4. `sft_more`: more SFT from the warm start for the same wall-clock compute as stage 3: the
   GRPO stage's seconds of training (its steps' `time/step`, the first step, which compiles,
   counted at the median) divided by the warm start's median seconds per SFT step, written
   to `plan.json` once so that a resumed demo keeps it; at the GRPO stage's learning rate
   (`experiment.sft_more_learning_rate`), with the warm start's batch size; then evaluate.
5. The table (rows start, +SFT, +SFT same compute, +Vision-R1; columns mAP, AP50, AP75, AR100,
   mean matched IoU, parse rate), printed and written to `results.md` / `results.json`, and
   `results.png`: the training curves and example predictions of each model.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from visionr1_jax import checkpoint, config_lib, evaluate, fs, loading, processing, render, train
from visionr1_jax import metrics as metrics_lib
from visionr1_jax.data import config as data_config_lib
from visionr1_jax.data import pipeline
from visionr1_jax.sections.run import validate_experiment
from visionr1_jax.sections.training import sft_config

ROWS = (
    ("start", "start"),
    ("sft", "+SFT"),
    ("sft_more", "+SFT (same compute)"),
    ("grpo", "+Vision-R1"),
)
COLUMNS = (
    ("AP", "mAP"),
    ("AP50", "AP50"),
    ("AP75", "AP75"),
    ("AR100", "AR100"),
    ("matched_iou", "matched IoU"),
    ("parse_rate", "parse rate"),
)


# ----------------------------------------------------------------------------- stage configs


def _unlocked(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
    del c["experiment"]
    return c


def sft_stage(config, steps: int, init_from: str = "") -> ml_collections.ConfigDict:
    """The config of an SFT stage of `steps` steps: the warm start (from the initial model), or
    with `init_from` (a stage directory) the continuation, at `experiment.sft_more_learning_rate`
    (None: the GRPO stage's `optim.learning_rate`, so that both continuations move from the
    warm start with the same optimizer settings) without warm-up."""
    e = config.experiment
    c = _unlocked(config)
    c.objective = "sft"
    c.total_steps = int(steps)
    c.sft = sft_config()
    if e.sft_batch_size:
        c.data.batch_size = int(e.sft_batch_size)
    if init_from:
        more = e.sft_more_learning_rate
        c.optim.learning_rate = float(config.optim.learning_rate if more is None else more)
        c.optim.warmup_steps = 0
    else:
        c.optim.learning_rate = float(e.sft_learning_rate)
        c.optim.warmup_steps = min(int(e.sft_warmup_steps), int(steps))
    c.metrics.render_every = 0
    c.model.init_from = init_from
    c.eval.every = 0
    return c


def grpo_stage(config, init_from: str) -> ml_collections.ConfigDict:
    """The config of the Vision-R1 stage: the run config itself, from the warm start."""
    c = _unlocked(config)
    c.model.init_from = init_from
    c.eval.every = 0
    return c


# ------------------------------------------------------------------------------------ stages


def _log(text: str) -> None:
    print(text, flush=True)


def _final_step(workdir: str) -> int | None:
    """The newest complete checkpoint step of the stage in `workdir` (None: none yet)."""
    try:
        return max(checkpoint.checkpoint_steps(workdir))
    except FileNotFoundError:
        return None


def train_stage(name: str, config, workdir: str) -> None:
    """Trains one stage to `config.total_steps` (resuming from its checkpoints), unless done."""
    if _final_step(workdir) == int(config.total_steps):
        _log(f"[{name}] done ({config.total_steps} steps): skipped")
        return
    _log(f"[{name}] training {config.total_steps} steps ({config.objective}) in {workdir}")
    train.run(config, workdir)


def eval_stage(name: str, config, workdir: str, step: int | None) -> dict[str, float]:
    """Evaluates the stage's checkpoint `step` (None: the initial model), unless done."""
    tag = "base" if step is None else f"step_{step}"
    path = fs.join(workdir, "eval", f"{tag}.json")
    if fs.exists(path):
        _log(f"[{name}] evaluation {tag}: done, read from {path}")
    else:
        _log(f"[{name}] evaluating {tag}")
        evaluate.run(config, workdir, checkpoint="base" if step is None else str(step))
    return fs.read_json(path)["metrics"]


def training_seconds(rows: list[Mapping[str, Any]]) -> float:
    """Seconds a stage trained: its steps' `time/step`, the first (which compiles) counted at
    the median of the others (evaluation and checkpoint time excluded)."""
    times = [float(m["time/step"]) for m in rows if "time/step" in m]
    if len(times) < 2:
        raise ValueError("a stage needs at least 2 steps to measure its compute")
    return float(np.median(times[1:]) + np.sum(times[1:]))


def same_compute_steps(grpo_rows, sft_rows) -> tuple[int, dict[str, float]]:
    """SFT steps that take the GRPO stage's training seconds (`training_seconds`) at the warm
    start's median seconds per SFT step (its first, compiling, step left out)."""
    grpo_s = training_seconds(grpo_rows)
    per_step = float(np.median([float(m["time/step"]) for m in sft_rows[1:]]))
    steps = max(1, round(grpo_s / per_step))
    return steps, {"grpo_seconds": grpo_s, "sft_seconds_per_step": per_step, "steps": steps}


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Records the config in `<workdir>/experiment_config.json` on the first run; a later run
    must have the same one (it resumes the stages done with it), else ValueError: results of
    two configs would be mixed in one table."""
    path = fs.join(workdir, "experiment_config.json")
    mine = json.loads(config.to_json_best_effort(sort_keys=True))
    if fs.exists(path):
        theirs = fs.read_json(path)
        if theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"{workdir} holds an experiment run with another config (sections differing: "
                f"{changed}); resume it with the same config, or use another --workdir "
                "(or delete that one to start afresh)"
            )
        return
    fs.write_json(path, mine, indent=1, sort_keys=True)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    """Runs the experiment (module docstring); returns {row: metrics}."""
    validate_experiment(config)
    check_workdir(config, workdir)
    d = {name: fs.join(workdir, name) for name, _ in ROWS}
    sft_cfg = sft_stage(config, config.experiment.sft_steps)
    grpo_cfg = grpo_stage(config, init_from=d["sft"])
    for c in (sft_cfg, grpo_cfg):
        config_lib.validate(c)  # every stage's config, before anything compiles
    results = {}

    results["start"] = eval_stage("start", sft_cfg, d["start"], None)
    train_stage("sft", sft_cfg, d["sft"])
    results["sft"] = eval_stage("sft", sft_cfg, d["sft"], int(sft_cfg.total_steps))
    train_stage("grpo", grpo_cfg, d["grpo"])
    results["grpo"] = eval_stage("grpo", grpo_cfg, d["grpo"], int(grpo_cfg.total_steps))

    plan_path = fs.join(workdir, "plan.json")
    if fs.exists(plan_path):
        plan = fs.read_json(plan_path)
    else:
        read = lambda n: metrics_lib.read_jsonl(fs.join(d[n], "metrics.jsonl"))
        _, plan = same_compute_steps(read("grpo"), read("sft"))
        fs.write_json(plan_path, plan, indent=1)
    _log(
        f"[sft_more] same compute as GRPO: {plan['grpo_seconds']:.1f} s / "
        f"{plan['sft_seconds_per_step']:.3f} s per SFT step = {plan['steps']} steps"
    )
    more_cfg = sft_stage(config, plan["steps"], init_from=d["sft"])
    train_stage("sft_more", more_cfg, d["sft_more"])
    results["sft_more"] = eval_stage("sft_more", more_cfg, d["sft_more"], plan["steps"])

    table = format_table(results, plan)
    _log("\n" + table)
    fs.write_text(fs.join(workdir, "results.md"), table + "\n")
    record = {"seed": int(config.seed), "plan": plan, "results": results}
    fs.write_json(fs.join(workdir, "results.json"), record, indent=1)
    png = plot(workdir, results, config)
    _log(f"results: {workdir}/results.md, {workdir}/results.json, {png}")
    return results


def format_table(results: Mapping[str, Mapping[str, float]], plan: Mapping | None = None) -> str:
    """The paper's Table 1 shape: one row per model, COCO metrics in percent."""
    head = "| model | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for key, title in ROWS:
        if key not in results:
            continue
        m = results[key]
        cells = [f"{100 * m[k]:.1f}" if m.get(k, -1) >= 0 else "n/a" for k, _ in COLUMNS]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if plan:
        lines.append(
            f"\n+SFT (same compute): {plan['steps']} SFT steps = the GRPO stage's "
            f"{plan['grpo_seconds']:.0f} s of training at {plan['sft_seconds_per_step']:.3f} s "
            "per SFT step."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- plot


def _examples(workdir: str, config, tags: Mapping[str, str], count: int):
    """Panels of the first `count` evaluation images per model: the image the model saw,
    ground truth (green) and the model's boxes (red). tags: row → `<dir>/eval/<tag>` prefix."""
    path = loading.checkpoint_path(config, fs.join(workdir, "sft"))
    processor = processing.load_processor(path)
    images, targets = [], []
    for hb in pipeline.InputPipeline(data_config_lib.eval_config(config.data), processor):
        a = hb.arrays
        pixels = a["pixel_patches"] if "pixel_patches" in a else a["pixel_values"]
        valid = np.nonzero(a["valid"])[0]
        images += [
            render.images_from_pixel_values(pixels, a["image_grid_thw"], processor.image_processor)[
                i
            ]
            for i in valid
        ]
        targets += hb.targets()
        if len(images) >= count:
            break
    panels = {}
    for row, prefix in tags.items():
        lines = fs.read_text(prefix + "_predictions.jsonl").splitlines()[:count]
        answers = [evaluate.Answer.from_json(json.loads(x)) for x in lines]
        preds = [(a.boxes, a.labels) for a in answers]
        panels[row] = render.render_examples(images[:count], targets[:count], preds)
    return panels


def plot(workdir: str, results, config) -> str:
    """`results.png`: SFT loss, GRPO reward and matched IoU, the table's mAP / AP50 per model,
    and example predictions of each model on the same evaluation images."""
    import matplotlib  # optional: only the experiment's plot needs it (slow to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: as above

    read = lambda n: metrics_lib.read_jsonl(fs.join(workdir, n, "metrics.jsonl"))
    rows = [(k, t) for k, t in ROWS if k in results]
    tags = {}
    for key, _ in rows:
        found = sorted(
            f[: -len("_predictions.jsonl")]
            for f in fs.listdir(fs.join(workdir, key, "eval"))
            if f.endswith("_predictions.jsonl")
        )
        if found:
            tags[key] = fs.join(workdir, key, "eval", found[-1])
    count = int(config.experiment.examples)
    panels = _examples(workdir, config, tags, count)

    fig = plt.figure(figsize=(4 * max(3, count), 4 + 2.6 * len(panels)))
    grid = fig.add_gridspec(1 + len(panels), max(3, count))
    ax = fig.add_subplot(grid[0, 0])
    sft_rows, more_rows = read("sft"), read("sft_more")
    ax.plot([m["step"] for m in sft_rows], [m["loss"] for m in sft_rows], label="SFT warm start")
    n0 = len(sft_rows)
    ax.plot([n0 + m["step"] for m in more_rows], [m["loss"] for m in more_rows],
            label="+SFT (same compute)")  # fmt: skip
    ax.set(xlabel="SFT step", ylabel="loss", title="SFT", yscale="log")
    ax.legend()
    ax = fig.add_subplot(grid[0, 1])
    grpo_rows = read("grpo")
    for key in ("reward/total", "matched_iou", "parse_rate"):
        ax.plot([m["step"] for m in grpo_rows], [m.get(key, np.nan) for m in grpo_rows], label=key)
    ax.set(xlabel="GRPO step", title="Vision-R1 (GRPO) rollouts")
    ax.legend()
    ax = fig.add_subplot(grid[0, 2])
    x = np.arange(len(rows))
    for j, (key, title) in enumerate((("AP", "mAP"), ("AP50", "AP50"), ("matched_iou", "IoU"))):
        ax.bar(x + (j - 1) * 0.27, [100 * results[k].get(key, 0) for k, _ in rows], 0.27,
               label=title)  # fmt: skip
    ax.set_xticks(x, [t for _, t in rows], rotation=15, fontsize=8)
    ax.set(title="evaluation (%)")
    ax.legend()
    for r, (key, title) in enumerate((k, t) for k, t in rows if k in panels):
        for j, panel in enumerate(panels[key]):
            ax = fig.add_subplot(grid[1 + r, j])
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(title)
    fig.tight_layout()
    out = fs.join(workdir, "results.png")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    fs.write_bytes(out, png.getvalue())
    plt.close(fig)
    return out
