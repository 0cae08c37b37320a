"""The `make demo` experiment (issue 12): its stages run, write the table and the plot, and a
second run resumes (skips what is done); the same-compute rule and the config checks.

The end-to-end run uses the tiny model and 2-step stages (the real demo's numbers are in
BENCHMARKS.md: its 15 minutes belong to benchmarks, not the suite).
"""

from __future__ import annotations

import json
import os

import launch
import numpy as np
import pytest

from visionr1_jax import config_lib, experiment, metrics, sections
from visionr1_jax.data.builders import synthetic_shapes
from visionr1_jax.models import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_same_compute_steps_follow_the_grpo_stage_seconds():
    grpo = [{"step": i, "time/step": t, "compiles": 9}
            for i, t in enumerate((30.0, 2.0, 2.5, 1.5, 2.0))]  # first step compiles  # fmt: skip
    sft = [{"step": i, "time/step": t} for i, t in enumerate((20.0, 0.5, 0.4, 0.6, 0.5))]
    # GRPO: 2.0 + 2.5 + 1.5 + 2.0 plus the median 2.0 for the first = 10 s; SFT 0.5 s/step
    assert experiment.training_seconds(grpo) == pytest.approx(10.0)
    steps, plan = experiment.same_compute_steps(grpo, sft)
    assert steps == plan["steps"] == 20 and plan["sft_seconds_per_step"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 steps"):
        experiment.training_seconds(grpo[:1])
    # Killed after step 3 was logged, resumed from the checkpoint of step 2: step 3 is logged
    # again by a new process (a fresh compile count), and its compiling step is not counted.
    resumed = [*grpo[:4], {"step": 3, "time/step": 25.0, "compiles": 4},
               {"step": 4, "time/step": 2.0, "compiles": 4}]  # fmt: skip
    # steady steps 1, 2, 4: 2.0 + 2.5 + 2.0; steps 0 and 3 at their median 2.0
    assert experiment.training_seconds(resumed) == pytest.approx(10.5)


def test_table_has_the_paper_rows_and_columns():
    m = {"AP": 0.1234, "AP50": 0.5, "AP75": 0.0, "AR100": 0.25, "matched_iou": 0.6,
         "parse_rate": 1.0}  # fmt: skip
    table = experiment.format_table({k: m for k, _ in experiment.ROWS})
    lines = table.splitlines()
    assert lines[0] == "| model | mAP | AP50 | AP75 | AR100 | matched IoU | parse rate |"
    assert [x.split("|")[1].strip() for x in lines[2:]] == [t for _, t in experiment.ROWS]
    assert lines[2].endswith("| 12.3 | 50.0 | 0.0 | 25.0 | 60.0 | 100.0 |")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("sft_steps", 0, "experiment.sft_steps=0"),
        ("sft_learning_rate", 0.0, "experiment.sft_learning_rate=0.0"),
        ("sft_warmup_steps", 10**6, "not in"),
        ("sft_batch_size", 0, "experiment.sft_batch_size=0"),
    ],
)
def test_experiment_config_is_validated(key, value, message):
    c = config_lib.load_config(os.path.join(ROOT, "configs", "demo_cpu.py"))
    c.experiment[key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(c)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    ckpt = testing.tiny_checkpoint(
        tmp_path_factory, "qwen2_5_vl_tiny", tokenizer="small", min_pixels=3136,
        max_pixels=112 * 112,
    )  # fmt: skip
    data_dir = launch.write_dataset(tmp_path_factory.mktemp("exp_data"), num_train=16)
    ood = synthetic_shapes.ShapesConfig(
        name="loop_ood", num_train=1, num_validation=2, colors=("white",), max_scale=0.8
    )
    synthetic_shapes.SyntheticShapes(config=ood, data_dir=data_dir).download_and_prepare()
    reference = tmp_path_factory.mktemp("exp_ref") / "seeds.json"
    stat = {"mean": 0.25, "lo": 0.125, "hi": 0.375, "n": 2}
    domain = {"seeds": [0, 1], "rows": {k: {"AP": stat} for k, _ in experiment.ROWS},
              "paired": {"AP": stat, "AP75": stat}}  # fmt: skip
    reference.write_text(json.dumps({"seeds": [0, 1], "source": "a test",
                                     "in_domain": domain, "out_of_domain": domain}))  # fmt: skip
    c = config_lib.load_config(os.path.join(ROOT, "configs", "demo_cpu.py"))
    c.total_steps = 2
    c.progress = False
    c.model.checkpoint = ckpt
    c.data.builder_config, c.data.data_dir = "loop", data_dir
    c.data.eval_split = "validation"
    c.data.max_prompt_len = 160  # the small tokenizer and six categories
    c.experiment.ood_builder_config, c.experiment.ood_split = "loop_ood", "validation"
    c.experiment.reference_results = str(reference)
    c.eval.batch_size = 2
    c.data.batch_size = 2
    c.data.max_instances = 30
    c.grpo.num_generations = 2
    c.grpo.max_new_tokens = 8
    c.eval.max_new_tokens = 8
    c.mesh = sections.mesh_config(ici=(1, 1, 1))
    c.metrics.render_every = 0
    c.checkpoint.every = 1
    c.experiment.sft_steps = 2
    c.experiment.sft_warmup_steps = 0
    c.experiment.sft_batch_size = 2
    c.experiment.examples = 2
    return c


def test_experiment_runs_every_stage_and_resumes(small, tmp_path, capsys):
    results = experiment.run(small, str(tmp_path))
    out = capsys.readouterr().out
    assert set(results) == {k for k, _ in experiment.ROWS}
    for key, title in experiment.ROWS:
        assert out.count(f"| {title} |") == 2  # in domain and out of domain
        assert set(results[key]) >= {"AP", "AP50", "AR100", "parse_rate", "matched_iou"}
    # the committed record's intervals beside this run's numbers, labelled as not this run's
    assert out.count("| 25.00 [12.50, 37.50] |") == 2 * len(experiment.ROWS)
    assert "not this run's" in out and "Out of domain (synthetic_shapes/loop_ood" in out
    saved_ood = json.loads((tmp_path / "results.json").read_text())["results_ood"]
    steps = {"sft": 2, "grpo": 2}
    plan = json.loads((tmp_path / "plan.json").read_text())
    steps["sft_more"] = plan["steps"]
    for stage, n in steps.items():
        rows = metrics.read_jsonl(str(tmp_path / stage / "metrics.jsonl"))
        assert [m["step"] for m in rows] == list(range(n)), stage
        record = json.loads((tmp_path / stage / "eval" / f"step_{n}.json").read_text())
        assert record["metrics"] == results[stage]
        ood = json.loads((tmp_path / stage / "eval" / f"ood_step_{n}.json").read_text())
        assert ood["metrics"] == saved_ood[stage] and ood["tag"] == f"ood_step_{n}"
    assert json.loads((tmp_path / "start" / "eval" / "base.json").read_text())["step"] is None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == results and saved["plan"] == plan
    assert (tmp_path / "results.md").read_text().startswith("| model |")
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # Again: every stage is done, nothing is trained or evaluated anew.
    mtimes = {p: os.path.getmtime(p) for p in tmp_path.glob("*/metrics.jsonl")}
    again = experiment.run(small, str(tmp_path))
    out = capsys.readouterr().out
    assert again == results
    assert out.count("done (") == 3 and out.count(": done, read from") == 4
    assert {p: os.path.getmtime(p) for p in tmp_path.glob("*/metrics.jsonl")} == mtimes

    # Another config in the same workdir is refused (the table would mix two experiments).
    other = small.copy_and_resolve_references()
    other.seed = 1
    with pytest.raises(ValueError, match=r"another config \(sections differing: \['seed'\]\)"):
        experiment.run(other, str(tmp_path))
    assert np.isfinite(results["grpo"]["matched_iou"])
