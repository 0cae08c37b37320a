"""The paper's experiment in miniature (`make demo`): base → +SFT → +Vision-R1 against
+SFT for the same compute, evaluated alike, printed as the paper's Table 1.

`run(config, workdir)` (what `python -m visionr1_jax.main` runs when the config has an
`experiment` section, `configs/demo_cpu.py`) runs these stages, each in its own directory
under `workdir`, each resumable (a killed demo started again skips what is done and resumes
the stage it was in from its last checkpoint):

Every evaluation is on the evaluation split (`data.eval_split`) and, with
`experiment.ood_builder_config`, on an out-of-domain set of the same dataset (the paper's
Table 2 in miniature), one model load for both (`eval_stage`).

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
5. The tables (rows start, +SFT, +SFT same compute, +Vision-R1; columns mAP, AP50, AP75,
   AR100, mean matched IoU, parse rate; in domain, then out of domain), each row beside the
   committed multi-seed record's mean mAP and 95% interval (`experiment.reference_results`,
   labelled as not this run's), printed and written to `results.md` / `results.json` (with the
   GRPO stage's reward over its first and last fifth), and `results.png`: the training curves
   and example predictions of each model.
"""

from __future__ import annotations

import copy
import io
import itertools
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


def ood_config(stage: ml_collections.ConfigDict, experiment) -> ml_collections.ConfigDict | None:
    """A stage's config evaluated on the out-of-domain set: `experiment.ood_builder_config` of
    the same dataset, its split `experiment.ood_split`; None when the experiment has none."""
    name = experiment.get("ood_builder_config") or ""
    if not name:
        return None
    c = ml_collections.ConfigDict(copy.deepcopy(stage.to_dict()))
    c.data.builder_config = name
    c.data.eval_split = experiment.get("ood_split") or "test"
    return c


def eval_stage(
    name: str, config, workdir: str, step: int | None, ood: ml_collections.ConfigDict | None = None
) -> tuple[dict[str, float], dict[str, float] | None]:
    """Evaluates the stage's checkpoint `step` (None: the initial model) on the evaluation
    split and, with `ood` (`ood_config`), on the out-of-domain set (tag `ood_<tag>`), loading
    the model once; what is on disk already is read back. Returns (in domain, out of domain)."""
    tag = "base" if step is None else f"step_{step}"
    sets = [(tag, config)] + ([(f"ood_{tag}", ood)] if ood is not None else [])
    paths = {t: fs.join(workdir, "eval", f"{t}.json") for t, _ in sets}
    todo = [(t, c) for t, c in sets if not fs.exists(paths[t])]
    if len(todo) < len(sets):
        _log(f"[{name}] evaluation {tag}: done, read from {fs.join(workdir, 'eval')}")
    if todo:
        _log(f"[{name}] evaluating {tag}" + (" (in domain, out of domain)" if ood else ""))
        config_lib.validate(config)
        mesh = loading.make_run_mesh(config)
        ckpt = "base" if step is None else str(step)
        model, processor, _, at = evaluate.load_for_eval(config, workdir, ckpt, mesh)
        for t, c in todo:
            out, answers = evaluate.evaluate(model, processor, c, mesh, tag=t)
            evaluate.write_results(workdir, t, out, answers, c, at)
    found = [fs.read_json(paths[t])["metrics"] for t, _ in sets]
    return found[0], (found[1] if ood is not None else None)


def _steady(rows: list[Mapping[str, Any]]) -> tuple[list[float], int]:
    """The `time/step` of a stage's steps that compiled nothing, and how many steps there were.
    A step compiled when it is the first of its process: the first row, or one whose process
    compile count (`compiles`, cumulative per process) differs from the row before (a resumed
    stage starts a new process). A step logged twice (written again after a resume) counts once,
    as last written. When every step compiled, all but the first count."""
    by_step = {int(m["step"]): m for m in rows if "time/step" in m}
    ordered = [by_step[k] for k in sorted(by_step)]
    steady = [
        float(m["time/step"])
        for prev, m in itertools.pairwise(ordered)
        if m.get("compiles", prev.get("compiles")) == prev.get("compiles")
    ]
    if not steady:  # every step compiled something (a 2-step stage): all but the first
        steady = [float(m["time/step"]) for m in ordered[1:]]
    return steady, len(ordered)


def training_seconds(rows: list[Mapping[str, Any]]) -> float:
    """Seconds a stage trained: its steps' `time/step`, each step that compiled (the first, and
    the first after a resume) counted at the median of the others (evaluation and checkpoint
    time excluded)."""
    steady, n = _steady(rows)
    if not steady:
        raise ValueError("a stage needs at least 2 steps to measure its compute")
    return float(np.sum(steady) + (n - len(steady)) * np.median(steady))


def same_compute_steps(grpo_rows, sft_rows) -> tuple[int, dict[str, float]]:
    """SFT steps that take the GRPO stage's training seconds (`training_seconds`) at the warm
    start's median seconds per SFT step (its compiling steps left out)."""
    grpo_s = training_seconds(grpo_rows)
    steady, _ = _steady(sft_rows)
    per_step = float(np.median(steady))
    steps = max(1, round(grpo_s / per_step))
    return steps, {"grpo_seconds": grpo_s, "sft_seconds_per_step": per_step, "steps": steps}


def reward_fifths(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """The GRPO stage's mean `reward/total` over its first and its last fifth of steps."""
    r = [float(m["reward/total"]) for m in rows if "reward/total" in m]
    n = max(1, len(r) // 5)
    return {"first_fifth": float(np.mean(r[:n])), "last_fifth": float(np.mean(r[-n:]))}


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
    results, results_ood = {}, {}

    def evaluated(key, cfg, step):
        ood = ood_config(cfg, config.experiment)
        results[key], other = eval_stage(key, cfg, d[key], step, ood)
        if other is not None:
            results_ood[key] = other

    evaluated("start", sft_cfg, None)
    train_stage("sft", sft_cfg, d["sft"])
    evaluated("sft", sft_cfg, int(sft_cfg.total_steps))
    train_stage("grpo", grpo_cfg, d["grpo"])
    evaluated("grpo", grpo_cfg, int(grpo_cfg.total_steps))

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
    evaluated("sft_more", more_cfg, plan["steps"])

    reference = read_reference(config)
    table = format_table(results, plan, reference=reference and reference.get("in_domain"))
    if results_ood:
        table += (
            "\n\nOut of domain ("
            + _ood_title(config)
            + "):\n\n"
            + format_table(results_ood, reference=reference and reference.get("out_of_domain"))
        )
    if reference:
        table += "\n\n" + reference_note(reference)
    _log("\n" + table)
    fs.write_text(fs.join(workdir, "results.md"), table + "\n")
    grpo_rows = metrics_lib.read_jsonl(fs.join(d["grpo"], "metrics.jsonl"))
    record = {"seed": int(config.seed), "plan": plan, "results": results,
              "grpo_reward": reward_fifths(grpo_rows)}  # fmt: skip
    if results_ood:
        record["results_ood"] = results_ood
    fs.write_json(fs.join(workdir, "results.json"), record, indent=1)
    png = plot(workdir, results, config)
    _log(f"results: {workdir}/results.md, {workdir}/results.json, {png}")
    return results


def _ood_title(config: ml_collections.ConfigDict) -> str:
    e = config.experiment
    return f"{config.data.name}/{e.ood_builder_config}, split {e.ood_split}"


def format_table(
    results: Mapping[str, Mapping[str, float]],
    plan: Mapping | None = None,
    reference: Mapping | None = None,
) -> str:
    """The paper's Table 1 shape: one row per model, COCO metrics in percent. With `reference`
    (one domain of the committed multi-seed record, `read_reference`), a last column gives
    that record's mean mAP of the row and its 95% interval over seeds."""
    extra = reference is not None and "rows" in reference
    n = len(reference.get("seeds", [])) if extra else 0
    head = "| model | " + " | ".join(title for _, title in COLUMNS) + " |"
    if extra:
        head += f" committed {n}-seed mAP (95% CI) |"
    lines = [head, "|---" * (len(COLUMNS) + 1 + extra) + "|"]
    for key, title in ROWS:
        if key not in results:
            continue
        m = results[key]
        cells = [f"{100 * m[k]:.1f}" if m.get(k, -1) >= 0 else "n/a" for k, _ in COLUMNS]
        if extra:
            cells.append(_interval(reference["rows"].get(key, {}).get("AP")))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    if plan:
        lines.append(
            f"\n+SFT (same compute): {plan['steps']} SFT steps = the GRPO stage's "
            f"{plan['grpo_seconds']:.0f} s of training at {plan['sft_seconds_per_step']:.3f} s "
            "per SFT step."
        )
    paired = (reference or {}).get("paired")
    if paired:
        lines.append(
            f"\nVision-R1 - SFT (same compute), paired over the committed {n} seeds: "
            + ", ".join(f"{title} {_interval(paired.get(k), sign=True)}"
                        for k, title in (("AP", "mAP"), ("AP75", "AP75")) if k in paired)
        )  # fmt: skip
    return "\n".join(lines)


def _interval(stat: Mapping | None, sign: bool = False) -> str:
    """`mean [lo, hi]` in percent points, or `n/a`."""
    if not stat:
        return "n/a"
    f = "{:+.2f}" if sign else "{:.2f}"
    mean, lo, hi = (f.format(100 * stat[k]) for k in ("mean", "lo", "hi"))
    return f"{mean} [{lo}, {hi}]"


def read_reference(config) -> dict | None:
    """The committed multi-seed record `experiment.reference_results` (written by
    `benchmarks/demo_seeds.py`), or None when the config names none."""
    path = (config.get("experiment") or {}).get("reference_results") or ""
    return fs.read_json(path) if path else None


def reference_note(reference: Mapping) -> str:
    """Where the intervals beside this run's numbers come from."""
    return (
        f"The intervals are not this run's: they are the committed record of "
        f"{len(reference.get('seeds', []))} seeds ({reference.get('source', '?')}), "
        "a 95% t-interval over seeds, beside today's seed for comparison."
    )


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
    steps = np.array([m["step"] for m in grpo_rows])
    for key in ("reward/total", "matched_iou"):
        y = np.array([m.get(key, np.nan) for m in grpo_rows], np.float64)
        (line,) = ax.plot(steps, y, alpha=0.3, lw=0.8)
        w = max(1, len(y) // 10)  # the trend: a moving average over a tenth of the stage
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color=line.get_color(), label=f"{key} (mean of {w})")
    fifths = reward_fifths(grpo_rows)
    ax.set(xlabel="GRPO step", title="Vision-R1 (GRPO) rollouts: reward "
           f"{fifths['first_fifth']:.2f} (first fifth) -> "
           f"{fifths['last_fifth']:.2f} (last)")  # fmt: skip
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
