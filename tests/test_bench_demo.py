"""Smoke runs of benchmarks/demo_seeds.py (two seeds of the experiment at test size, the
paired table) and benchmarks/demo_speed.py (the demo's step before and after issue 26, a few
steps each): `make bench` keeps running."""

import bench_smoke
import pytest


@pytest.mark.parametrize("name", bench_smoke.names_for("test_bench_demo.py"))
def test_smoke_prints_its_table(name):
    bench_smoke.run_smoke(name)
