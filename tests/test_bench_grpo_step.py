"""Smoke runs of benchmarks/grpo_step.py (ours vs TRL's GRPOTrainer, one step each) and
benchmarks/rewards.py (ours vs the reference-style reward): `make bench` keeps running."""

import bench_smoke
import pytest


@pytest.mark.parametrize("name", bench_smoke.names_for("test_bench_grpo_step.py"))
def test_smoke_prints_its_table(name):
    bench_smoke.run_smoke(name)
