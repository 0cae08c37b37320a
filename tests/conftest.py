"""Test-session setup: 8 simulated CPU devices so sharded tests run on any machine.

XLA_FLAGS must be set before jax creates its CPU backend, which is why it lives here. Flags
already in the environment are kept and the device count is appended to them (replacing any
count they give: the sharded tests build meshes of exactly 8 devices), so those tests always
run. XLA:CPU compiles with the fast-compilation flags below unless XLA_FLAGS sets them.
"""

import os
import pathlib
import re

import pytest

NUM_DEVICES = 8
_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_device_count(flags: str, n: int = NUM_DEVICES) -> str:
    """`flags` (an XLA_FLAGS value) with exactly `n` host-platform devices."""
    found = re.search(_COUNT_FLAG + r"=\S*", flags)
    if found is None:
        return f"{flags} {_COUNT_FLAG}={n}".strip()
    return flags[: found.start()] + f"{_COUNT_FLAG}={n}" + flags[found.end() :]


# Fast XLA:CPU compilation (each flag kept as XLA_FLAGS gives it, when it does): the tests
# check what the programs compute, and most of their time is compilation. LLVM -O0 (XLA's own
# HLO passes still run) takes about 2/3 of the time (measured: tests/test_train_step.py 97 s ->
# 70 s); the classic elemental emitters instead of the MLIR fusion emitters halve the rest
# (measured: a 2-step tiny GRPO run compiles in 8.9 s instead of 17.7 s, 28 s of CPU instead
# of 45). Runs and benchmarks keep XLA's defaults. Subprocess runs get the same flags.
FAST_COMPILE_FLAGS = {
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_use_fusion_emitters": "false",
}


def with_fast_compile(flags: str) -> str:
    """`flags` (an XLA_FLAGS value) with each of `FAST_COMPILE_FLAGS` it does not set."""
    for name, value in FAST_COMPILE_FLAGS.items():
        if name not in flags:
            flags = f"{flags} {name}={value}"
    return flags.strip()


os.environ["XLA_FLAGS"] = with_fast_compile(with_device_count(os.environ.get("XLA_FLAGS", "")))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole suite: both pytest workers and every run
# the tests start as a subprocess (they inherit the environment) load a program another test
# already compiled instead of compiling it again (many files build the same tiny-model
# programs). jax keys an entry on the program, the XLA flags and the jax version, so a warm
# cache from an earlier `make test` changes no result; programs compiling in under 0.2 s are
# not worth a file. Tests that count compilations count cache hits too (`host.COMPILE_EVENTS`).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "xla_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The files that take longest (CPU seconds of one fresh `make test` on 2 cores, with the runs
# they start), run first: `make test`'s workers take whole files in collection order
# (`--no-loadscope-reorder`: pytest-xdist would otherwise order files by their number of
# tests), so a long file started last would run on alone at the end.
SLOW_FIRST = (
    "test_checkpoint_multiprocess.py",  # ~430 s
    "test_train_distributed.py",  # ~370 s
    "test_checkpoint.py",  # ~270 s
    "test_sampler.py",  # ~270 s
    "test_sft.py",  # ~160 s
    "test_models_qwen_vl.py",  # ~160 s
    "test_experiment.py",  # ~150 s
    "test_bench_demo.py",  # ~150 s
    "test_memory_levers.py",  # ~130 s
    "test_aot.py",  # ~110 s
    "test_rewards_matching.py",  # ~110 s
    "test_train_step.py",  # ~100 s
    "test_rewards_reference.py",  # ~90 s
    "test_train_loop.py",  # ~90 s
    "test_gcs_workflow.py",  # ~80 s
    "test_console.py",  # ~40 s
    "test_train_logprobs.py",
    "test_export.py",
    "test_lora.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep order


@pytest.fixture(scope="session")
def gcs():
    """One GCS emulator on 127.0.0.1 per test process (tests/gcs_emulator.py), its variables
    set in this process's environment for the whole session (gcsfs and TensorStore keep the
    endpoint they first saw, so every test of a process must share one emulator). Yields a
    `gcs_emulator.Session`: `.endpoint`, `.env` (for subprocesses), `.prefix()` (a fresh
    `gs://bucket/<unique>` folder per call)."""
    import gcs_emulator  # tests/ helper: imported only by the tests that ask for a bucket

    with gcs_emulator.emulator() as endpoint:
        env = gcs_emulator.environment(endpoint)
        with gcs_emulator.patched_environ(env):
            yield gcs_emulator.Session(endpoint, env)
