"""Launching real `python -m visionr1_jax.main` runs from tests: one process, or several
joined by `jax.distributed` on localhost, each with its own count of simulated CPU devices.

    config = launch.write_config(tmp_dir)              # configs/demo_cpu.py, test-ready
    run = launch.start(config, workdir, {"total_steps": 2, ...}, processes=2, devices=4)
    run.wait()                                         # fails the test with the log tails
    launch.committed(workdir)                          # the committed checkpoint steps

Every process writes its stdout and stderr to its own log in the workdir (a restarted run
gets new ones). All runs compile with the tests' fast XLA:CPU flags (conftest), so every run of
a test computes bit for bit the same; `cache` shares jax's persistent compilation cache
between runs, so a restarted run loads its programs instead of compiling them (as a user's
restarted job can). Only process 0 of a multi-process run gains from it: jax writes the cache
from process 0 only, and on CPU the other processes' cache keys differ from process 0's
(measured with JAX_EXPLAIN_CACHE_MISSES), so they compile at every start.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import conftest
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_cpu.py")

# `main` locks the config: `--config.<key>=value` can only set keys it has. The wrapper makes
# sure of `log_rollouts`, of a `checkpoint` section with the defaults (saves only at the end
# and on SIGTERM unless `checkpoint.every` is given) and of an `eval` section (none runs unless
# `eval.every` is given), whatever the demo's are.
CONFIG_WRAPPER = """
import importlib.util

_spec = importlib.util.spec_from_file_location("demo_cpu", {demo!r})
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config():
    from visionr1_jax import sections

    config = _demo.get_config("experiment=False")
    config.log_rollouts = 0
    config.checkpoint = sections.checkpoint_config()
    config.eval = sections.eval_config()  # every = 0: no evaluation unless overridden
    return config
"""


def write_config(directory: Any) -> str:
    """Writes the wrapped demo config into `directory`; returns its path."""
    path = os.path.join(str(directory), "config.py")
    with open(path, "w") as f:
        f.write(CONFIG_WRAPPER.format(demo=DEMO))
    return path


def write_dataset(directory: Any, num_train: int = 16) -> str:
    """A `synthetic_shapes` dataset (builder config "loop") in `directory`, opened by name:
    multi-process runs do not build synthetic data."""
    from visionr1_jax.data.builders import synthetic_shapes

    shapes = synthetic_shapes.ShapesConfig(name="loop", num_train=num_train, num_validation=2)
    synthetic_shapes.SyntheticShapes(config=shapes, data_dir=str(directory)).download_and_prepare()
    return str(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(
    config: str, workdir: str, overrides: Mapping[str, Any], processes: int = 1
) -> list[list[str]]:
    """The `main` command line of each process of one run (a fresh coordinator port when
    `processes` > 1)."""
    cmd = [
        sys.executable, "-m", "visionr1_jax.main", f"--config={config}",
        f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]  # fmt: skip
    if processes == 1:
        return [cmd]
    dist = [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
    return [[*cmd, *dist, f"--process_id={i}"] for i in range(processes)]


def environment(devices: int, cache: str | None = None) -> dict[str, str]:
    """The processes' environment: `devices` CPU devices each, the fast-compilation XLA:CPU
    flags (`conftest.FAST_COMPILE_FLAGS`; every run alike), and jax's persistent
    compilation cache in `cache` (every program written, however fast it compiled)."""
    flags = conftest.with_device_count(os.environ.get("XLA_FLAGS", ""), devices)
    flags = conftest.with_fast_compile(flags)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=ROOT)
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def tail(log: str, n: int = 3000) -> str:
    with open(log, errors="replace") as f:
        return f.read()[-n:]


@dataclasses.dataclass
class Run:
    """The processes of one `main` run and their logs."""

    workdir: str
    procs: list[subprocess.Popen]
    logs: list[str]

    def poll(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def running(self) -> bool:
        """Whether any process is still running."""
        return any(code is None for code in self.poll())

    def failed(self) -> bool:
        """Whether any process has exited with an error."""
        return any(code not in (None, 0) for code in self.poll())

    def text(self, i: int = 0) -> str:
        with open(self.logs[i], errors="replace") as f:
            return f.read()

    def tails(self, n: int = 3000) -> str:
        return "\n".join(
            f"--- process {i} (exit {p.poll()}): {log} ---\n{tail(log, n)}"
            for i, (p, log) in enumerate(zip(self.procs, self.logs, strict=True))
        )

    def send_signal(self, sig: int) -> None:
        """`sig` to every process still running (all at once, as a pod losing its hosts)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def kill(self) -> None:
        """SIGKILLs every process still running and reaps them all."""
        self.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait_for(self, condition: Callable[[], Any], timeout: float = 600) -> None:
        """Returns once `condition()` is true; a process exiting first (or the timeout) kills
        the rest and fails the test with every process's log tail."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not all(code is None for code in self.poll()) or time.monotonic() > deadline:
                if condition():  # it came true as the process exited
                    return
                self.kill()
                pytest.fail(f"run {self.workdir} stopped or timed out:\n{self.tails()}")
            time.sleep(0.01)

    def wait(self, timeout: float = 600) -> list[int]:
        """The exit codes once every process has exited with 0. A failing process (the others
        would wait for it in a collective) or the timeout kills the rest and fails the test
        with every process's log tail."""
        deadline = time.monotonic() + timeout
        while self.running() and not self.failed() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.running() or self.failed():
            self.kill()
            pytest.fail(f"run {self.workdir} failed or timed out:\n{self.tails()}")
        return [p.returncode for p in self.procs]


def start(
    config: str,
    workdir: str,
    overrides: Mapping[str, Any],
    processes: int = 1,
    devices: int = 1,
    cache: str | None = None,
    logdir: str | None = None,
) -> Run:
    """Starts the `processes` of one `main` run of `config` with `overrides`, each with
    `devices` CPU devices (see `command`, `environment`). The logs go to `logdir` (default:
    the workdir; a local folder is needed for a `gs://` workdir)."""
    logdir = logdir or workdir
    os.makedirs(logdir, exist_ok=True)
    env = environment(devices, cache)
    label = time.monotonic_ns()
    procs, logs = [], []
    for i, cmd in enumerate(command(config, workdir, overrides, processes)):
        log = os.path.join(logdir, f"log_{label}_process_{i}.txt")
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=f))
        logs.append(log)
    return Run(workdir, procs, logs)


def wait_all(runs: Mapping[str, Run], timeout: float) -> None:
    """Waits for every run to exit 0. A failed run (or the timeout) stops all the others and
    fails the test with the log tails of each of its processes (of all runs on timeout)."""
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(r.running() for r in runs.values()):
            failed = next((n for n, r in runs.items() if r.failed()), None)
            if failed is not None:
                break
            if time.monotonic() > deadline:
                failed = "timeout"
                break
            time.sleep(1)
        else:
            failed = next((n for n, r in runs.items() if r.failed()), None)
    finally:
        for r in runs.values():
            r.kill()
    if failed is not None:
        logs = "\n".join(
            f"--- {n} ---\n{r.tails()}"
            for n, r in runs.items()
            if n == failed or failed == "timeout"
        )
        pytest.fail(f"run {failed!r} failed:\n{logs}")


def committed(workdir: str) -> list[int]:
    """The steps of the committed checkpoints in `workdir` (orbax renames a step's directory
    into place once every item and every host is done)."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def writing(workdir: str) -> bool:
    """Whether a checkpoint is being written (orbax's temporary step directory exists)."""
    return bool(glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")))
