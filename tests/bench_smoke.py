"""Runs a benchmark's `--smoke` mode the way `make bench` runs the benchmark (STYLE point 14).

Every file in benchmarks/ has a smoke mode: one step or one iteration at tiny sizes, both sides
of its comparison (TRL, transformers, the reference reward, orbax's default handler, ...), and
still its result table with the ratio. tests/test_bench_*.py run them as subprocesses (repo
root as cwd, this interpreter), so a refactor that breaks `make bench` fails the suite. The
smoke numbers mean nothing (one step, compilation included).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# benchmarks/<name>.py -> the test file that runs its smoke mode and the lines (regular
# expressions, searched line by line) that its output must hold: the result rows with their
# ratio columns. A new benchmark needs an entry here (tests/test_bench_model.py checks it).
BENCHMARKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "grpo_step": (
        "test_bench_grpo_step.py",
        (
            r"^\| vocab \| steps/run \| ours steps/s .* \| ratio \(best runs\) \|",
            r"^\| small \([\d,]+\) \| 1 \| [\d.]+ \([\d.]+ s\) \| [\d.]+ \([\d.]+ s\) "
            r"\| [\d.]+x \| [\d.]+x \| [\d,]+ MB \| [\d,]+ MB "
            r"\| [\d.]+ / [\d.]+ / [\d.]+ / [\d.]+ \|$",
        ),
    ),
    "rewards": (
        "test_bench_grpo_step.py",
        (
            r"^end-to-end  C=\s+16  ours .* wall ratio\s+[\d.]+x  CPU-time ratio\s+[\d.]+x"
            r"  \(agreement 1\.0000\)$",
            r"^matching    C=\s+16  scipy loop .* speed vs scipy loop\s+[\d.]+x$",
            r"^matching    C=\s+16  ours, 1 device .* speed vs scipy loop\s+[\d.]+x$",
            r"^matching    C=\s+16  ours, \d+ devices .* speed vs scipy loop\s+[\d.]+x$",
        ),
    ),
    "checkpoint_cost": (
        "test_bench_checkpoint.py",
        (
            r"^\| run \| saves \| median step \(s\) \|",
            r"^\| none \| 0 \| [\d.]+ \| – \| – \| [\d.]+ \|$",
            r"^\| async \| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$",
            r"^\| sync \| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$",
        ),
    ),
    "checkpoint_first_save": (
        "test_bench_checkpoint.py",
        (
            r"^orbax_default\s+[\d.]+\s+[\d.]+\s+[\d.]+$",
            r"^ours\s+[\d.]+\s+[\d.]+\s+[\d.]+$",
            r"^orbax default / ours: blocked x[\d.]+, CPU x[\d.]+$",
        ),
    ),
    "forward": (
        "test_bench_model.py",
        (r"^qwen2_5_vl_tiny\s+B=1 T=\d+ P=\d+ .*[\d.]+x \|.*[\d.]+x$",),
    ),
    "sampler": (
        "test_bench_model.py",
        (
            r"^\| B x G \| ours tok/s \| transformers tok/s \| ratio \(best of rounds\) \|",
            r"^\| 1 x 2 = 2 \| [\d,]+ \| [\d,]+ \| [\d.]+x \| [\d.]+x \| [\d.]+x \|",
        ),
    ),
    "input_pipeline": (
        "test_bench_model.py",
        (
            r"^\| coco .* \| [\d.]+/s, [\d.]+ CPU ms \| [\d.]+/s, [\d.]+ CPU ms \| [\d.]+x "
            r"\(CPU per sample [\d.]+x less\) \| [\d.]+/s \|$",
            r"^\| demo .* \| [\d.]+/s, [\d.]+ CPU ms \| [\d.]+/s, [\d.]+ CPU ms \| [\d.]+x "
            r"\(CPU per sample [\d.]+x less\) \| [\d.]+/s \|$",
            r"^- demo train loop, simulated step \d+ ms, 2 steps: wait .* mean [\d.]+ ms",
        ),
    ),
    "demo_seeds": (
        "test_bench_demo.py",
        (
            r"^\| 1 \| \+Vision-R1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$",
            r"^\| paired \(2\) \| Vision-R1 - SFT \(same compute\) \| [+-][\d.]+ \[",
        ),
    ),
    "demo_speed": (
        "test_bench_demo.py",
        (
            r"^\| before \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$",
            r"^\| after / before \| \| [\d.]+x \| \| [\d.]+x \| \|$",
        ),
    ),
}

_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def names_for(test_file: str) -> list[str]:
    """The benchmarks whose smoke mode `test_file` runs."""
    return [name for name, (f, _) in BENCHMARKS.items() if f == test_file]


def run_smoke(name: str, timeout_s: float = 600) -> str:
    """Runs `benchmarks/<name>.py --smoke`; asserts exit 0 and its table lines; returns stdout.

    The environment is the suite's (fast XLA compilation, the shared compilation cache) without
    its 8 simulated devices: the benchmarks measure on the host's devices, as `make bench` runs
    them (and checkpoint_first_save and rewards set their own device counts).
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split())
    out = subprocess.run(
        [sys.executable, f"benchmarks/{name}.py", "--smoke"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip
    log = f"stdout:\n{out.stdout[-4000:]}\nstderr:\n{out.stderr[-6000:]}"
    assert out.returncode == 0, f"benchmarks/{name}.py --smoke exited {out.returncode}\n{log}"
    lines = out.stdout.splitlines()
    for pattern in BENCHMARKS[name][1]:
        assert any(re.search(pattern, line) for line in lines), f"no line {pattern!r}\n{log}"
    return out.stdout
