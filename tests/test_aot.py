"""The AOT tool (issue 13) on the tiny config for a small TPU topology, without TPUs.

`python -m visionr1_jax.tools.aot` runs in the TPU venv (`.venv-tpu`, made by `make test` and
`make aot` from requirements-tpu.txt; `VISIONR1_TPU_PYTHON` names another interpreter). Checks:

- every program compiles for `v5e:2x2` with the parameters FSDP-sharded over its 4 chips; its
  peak memory is above the state it must hold and within the chip, FLOPs and bytes are
  positive; the train step's arguments hold at least a quarter of the float32 parameters,
  Adam's two moments and the reference (sharded 4 ways) and at most all of them;
- the rollout's weight copy in bfloat16 reads fewer bytes per decoding step than the float32
  master weights, by about the weights' bytes saved; a program that does not fit (here:
  99.999% of the HBM demanded free) makes the tool exit 1.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PYTHON = os.environ.get("VISIONR1_TPU_PYTHON", os.path.join(ROOT, ".venv-tpu", "bin", "python"))
CONFIG = os.path.join(ROOT, "configs", "demo_cpu.py") + ":experiment=False"
BASE = [
    f"--config={CONFIG}",
    "--topology=v5e:2x2",
    "--config.model.dtype=bfloat16",
    "--config.mesh.ici_parallelism=(1,4,1)",
]


def run_aot(tmp_path, *args: str) -> tuple[int, dict, str]:
    if not os.path.exists(TPU_PYTHON):
        pytest.fail(f"no TPU venv at {TPU_PYTHON}: `make test` (or `make aot`) creates it")
    out = tmp_path / f"aot{len(list(tmp_path.iterdir()))}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    proc = subprocess.run(
        [TPU_PYTHON, "-m", "visionr1_jax.tools.aot", *BASE, f"--json={out}", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, report, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    rc, report, log = run_aot(tmp_path_factory.mktemp("aot"))
    assert rc == 0, log[-3000:]
    return report, log


def test_every_program_compiles_and_fits_the_chip(full):
    report, log = full
    hbm = report["hbm_bytes"]
    assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 4
    assert 15 * 2**30 < hbm <= 16 * 2**30  # a v5e chip has 16 GiB, the compiler keeps some
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert set(report["programs"]) == {"rollout", "prefill", "decode_step", "reference",
                                       "train_step"}  # fmt: skip
    for name, r in report["programs"].items():
        assert r["fits"], (name, r)
        assert 0 < r["peak"] < hbm, (name, r)
        assert r["flops"] > 0 and r["bytes_accessed"] > 0, (name, r)
        assert r["peak"] >= r["argument"] - r["alias"], (name, r)
    assert f"{report['devices']} devices" in log and "fits" in log


def test_train_step_holds_the_sharded_state(full):
    report, _ = full
    facts, r = report["facts"], report["programs"]["train_step"]
    # f32 parameters + Adam's two moments + the reference copy: 16 bytes per trained parameter
    # (the vision tower is trained here), over 4 devices when every dimension divides, all of
    # it on each device at most (a dimension the mesh does not divide stays replicated).
    state = 16 * facts["trained"]
    assert state / 4 <= r["argument"] <= state + 2**20
    assert r["alias"] >= 0.9 * r["argument"] - 2**20  # the state is donated: updated in place


def test_bf16_rollout_copy_reads_fewer_bytes_and_a_program_that_does_not_fit_exits_1(
    tmp_path, full
):
    report, _ = full
    # The float32 master weights' decoding step, with 99.999% of the HBM demanded free: it
    # does not fit, so the tool exits 1 (and still writes its report).
    rc, master, log = run_aot(
        tmp_path, "--programs=decode_step", "--config.grpo.rollout_copy=False",
        "--headroom=0.99999",
    )  # fmt: skip
    assert rc == 1, log[-3000:]
    assert master["fits"] is False and "DOES NOT FIT" in log
    copy_bytes = report["programs"]["decode_step"]["bytes_accessed"]
    master_bytes = master["programs"]["decode_step"]["bytes_accessed"]
    # The decoding step reads the text decoder's weights (not the vision tower's): in bf16
    # that is half the float32 bytes; the KV cache and activations read the same either way.
    f = report["facts"]
    text = f["params"] - f["vision"]
    assert copy_bytes < master_bytes
    assert master_bytes - copy_bytes >= 0.5 * (2 * text) / 4, (copy_bytes, master_bytes)
