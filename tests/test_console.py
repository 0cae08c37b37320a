"""The console of the command lines (issue 29): the libraries' INFO lines off by default.

A 2-step GRPO run of `python -m visionr1_jax.main` (the tiny model, a checkpoint every step:
orbax logs dozens of INFO lines per save) and the export of its checkpoint print no line in
absl's INFO format and no `INFO`; the progress bar, this package's own lines (`run finished`)
and the export's `wrote` line stay, and no warning is printed twice. The same run resumed with
`--verbosity=info` prints absl's INFO lines again (orbax's among them), in absl's format.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import launch
import pytest

from visionr1_jax.models import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_INFO = re.compile(r"^I\d{4} ", re.M)  # absl: I<mmdd> <time> <thread> <file>:<line>]
ABSL_WARNING = re.compile(r"^W\d{4} \S+ \d+ (.*)$", re.M)


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> dict:
    ckpt = testing.tiny_checkpoint(
        tmp_path_factory, "qwen2_5_vl_tiny", tokenizer="small", min_pixels=3136,
        max_pixels=112 * 112,
    )  # fmt: skip
    data_dir = launch.write_dataset(tmp_path_factory.mktemp("console_data"), num_train=8)
    return {
        "model.checkpoint": ckpt, "data.builder_config": "loop", "data.data_dir": data_dir,
        "data.batch_size": 2, "data.max_instances": 30, "grpo.num_generations": 2,
        "grpo.max_new_tokens": 8, "mesh.ici_parallelism": "(1,1,1)",
        "metrics.render_every": 0, "checkpoint.every": 1,
    }  # fmt: skip


def run(module: str, *args: str) -> str:
    """The command's stdout and stderr together (it must exit 0)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", module, *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def main_args(workdir: str, overrides: dict, steps: int) -> list[str]:
    config = os.path.join(ROOT, "configs", "demo_cpu.py") + ":experiment=False"
    flags = {**overrides, "total_steps": steps}
    return [f"--config={config}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in flags.items())]  # fmt: skip


def test_library_info_lines_are_off_unless_asked_for(overrides, tmp_path):
    workdir = str(tmp_path / "run")
    console = run("visionr1_jax.main", *main_args(workdir, overrides, steps=2))
    assert not ABSL_INFO.findall(console) and "INFO" not in console, console[-3000:]
    assert "run finished: 2 steps" in console.splitlines(), console[-3000:]
    assert "train: 100%" in console  # the progress bar
    warnings = collections.Counter(ABSL_WARNING.findall(console))
    assert all(n == 1 for n in warnings.values()), warnings

    exported = run("visionr1_jax.tools.export", f"--workdir={workdir}", f"--out={tmp_path}/hf")
    assert not ABSL_INFO.findall(exported) and "INFO" not in exported, exported[-3000:]
    assert f"wrote {tmp_path}/hf" in exported.splitlines(), exported[-3000:]

    # Resumed with --verbosity=info: absl's (and orbax's) INFO lines are back, in absl's format.
    again = run("visionr1_jax.main", *main_args(workdir, overrides, steps=3), "--verbosity=info")
    info = ABSL_INFO.findall(again)
    assert re.search(r"^I\d{4} .* train\.py:\d+\] resuming from checkpoint step 2", again, re.M)
    assert re.search(r"^I\d{4} .* checkpoint_manager\.py:\d+\] ", again, re.M), again[-3000:]
    assert len(info) > 20, again[-3000:]
