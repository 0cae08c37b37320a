"""scripts/tpu_pod.sh (issue 13) as a dry run (DRY_RUN=1 prints the gcloud commands): the
same command on every worker, the code copied and requirements-tpu.txt installed on every
worker, a preempted slice re-created and the run started again (it resumes from WORKDIR)."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "tpu_pod.sh")
ENV = dict(
    TPU_NAME="vr1", ZONE="us-central2-b", ACCELERATOR="v4-64", WORKDIR="gs://b/run",
    CONFIG="configs/tpu_v4_64.py", ARGS="--config.total_steps=10", DRY_RUN="1",
)  # fmt: skip


def sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **ENV, **env}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=full, cwd=ROOT)


def test_up_creates_copies_installs_and_runs_on_every_worker():
    out = sh("up")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "create vr1" in lines[0] and "--accelerator-type=v4-64" in lines[0]
    assert "--zone=us-central2-b" in lines[0]
    assert "scp" in lines[1] and "--worker=all" in lines[1]
    install = next(line for line in lines if "requirements-tpu.txt" in line)
    assert "--worker=all" in install
    run = lines[-1]
    assert "--worker=all" in run and "visionr1_jax.main" in run
    assert "--config=configs/tpu_v4_64.py" in run and "--workdir=gs://b/run" in run
    assert "--config.total_steps=10" in run


def test_watch_recreates_a_slice_that_is_not_ready_and_runs_again():
    out = sh("watch")  # a dry run's state is never READY: the preempted path
    assert out.returncode == 0, out.stderr
    assert "re-creating and resuming" in out.stdout
    assert "delete vr1" in out.stdout and "create vr1" in out.stdout
    assert "visionr1_jax.main" in out.stdout.splitlines()[-1]


def test_run_needs_a_workdir_and_unknown_steps_show_the_usage():
    out = sh("run", WORKDIR="")
    assert out.returncode != 0 and "set WORKDIR" in out.stderr
    out = sh("nonsense")
    assert out.returncode == 2 and "tpu_pod.sh up" in out.stdout
