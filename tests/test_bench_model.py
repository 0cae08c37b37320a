"""Smoke runs of benchmarks/forward.py and benchmarks/sampler.py (ours vs transformers) and
benchmarks/input_pipeline.py (ours vs HF datasets + processor): `make bench` keeps running.
Also: every benchmark has a smoke run in one of tests/test_bench_*.py."""

import bench_smoke
import pytest


@pytest.mark.parametrize("name", bench_smoke.names_for("test_bench_model.py"))
def test_smoke_prints_its_table(name):
    bench_smoke.run_smoke(name)


def test_every_benchmark_has_a_smoke_run():
    files = sorted(p.stem for p in (bench_smoke.ROOT / "benchmarks").glob("*.py"))
    assert sorted(bench_smoke.BENCHMARKS) == files
    for name, (test_file, patterns) in bench_smoke.BENCHMARKS.items():
        assert (bench_smoke.ROOT / "tests" / test_file).is_file(), (name, test_file)
        assert patterns, name
        assert "--smoke" in (bench_smoke.ROOT / "benchmarks" / f"{name}.py").read_text(), name
