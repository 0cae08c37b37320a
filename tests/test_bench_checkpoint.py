"""Smoke runs of benchmarks/checkpoint_cost.py (no saves vs async vs sync, 2 steps each) and
benchmarks/checkpoint_first_save.py (orbax's handler vs ours): `make bench` keeps running."""

import bench_smoke
import pytest


@pytest.mark.parametrize("name", bench_smoke.names_for("test_bench_checkpoint.py"))
def test_smoke_prints_its_table(name):
    bench_smoke.run_smoke(name)
