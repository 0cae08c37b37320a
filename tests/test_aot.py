"""The AOT tool (issue 13) on the tiny config for a small TPU topology, without TPUs.

`python -m visionr1_jax.tools.aot` runs in the TPU venv (`.venv-tpu`, made by `make test` and
`make aot` from requirements-tpu.txt; `VISIONR1_TPU_PYTHON` names another interpreter). Checks:

- every program compiles for `v5e:2x2` with the parameters FSDP-sharded over its 4 chips; its
  peak memory is above the state it must hold and within the chip, FLOPs and bytes are
  positive; the roofline's HBM term is the floor (arguments + new outputs), which XLA's
  bytes accessed of the decoding step exceed; the train state held beside each program (not
  its argument) is counted; the train step's arguments hold at least a quarter of the
  float32 parameters, Adam's two moments and the reference (sharded 4 ways) and at most all
  of them;
- the rollout's weight copy in bfloat16 reads fewer bytes per decoding step than the float32
  master weights, by about the weights' bytes saved (XLA's count and the HBM floor); a
  program that does not fit (here: 99.999% of the HBM demanded free) makes the tool exit 1.
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
    sb = report["facts"]["state_bytes"]
    state = sb["params"] + sb["optimizer"] + sb["reference"] + sb["frozen"]
    # The rollout reads a bf16 copy: the whole float32 state stays resident beside it; the
    # reference pass reads the reference (and frozen) weights, the policy and Adam stay.
    want = {"rollout": state, "prefill": state, "decode_step": state, "train_step": 0.0,
            "reference": sb["params"] + sb["optimizer"]}  # fmt: skip
    for name, r in report["programs"].items():
        assert r["fits"], (name, r)
        assert 0 < r["peak"] < hbm, (name, r)
        assert r["resident"] == pytest.approx(want[name]), (name, r["resident"], want[name])
        assert r["flops"] > 0 and r["bytes_accessed"] > 0, (name, r)
        assert r["peak"] >= r["argument"] - r["alias"], (name, r)
        # the roofline's HBM term: arguments read and new outputs written once
        assert r["hbm_floor"] == r["argument"] + r["output"] - r["alias"] > 0, (name, r)
    assert f"{report['devices']} devices" in log and "fits" in log
    est = report["estimate"]
    bandwidth = 819e9  # v5e HBM bytes/s, one device per chip
    for name in ("prefill", "decode_step", "reference", "train_step"):
        assert est[f"seconds/{name}"] >= report["programs"][name]["hbm_floor"] / bandwidth, name
    # XLA's count of a loop-free program's bytes includes them (and on-chip traffic besides)
    decode = report["programs"]["decode_step"]
    assert decode["bytes_accessed"] >= decode["hbm_floor"], decode
    # FLOPs: XLA's or the model's (one step of the 4 devices' rows at the full cache), the
    # larger, at v5e's 197 TFLOP/s bf16
    from visionr1_jax.tools import aot

    modelled = aot.model_flops(report["facts"])["decode_step"] / 4
    assert modelled > 0
    want = max(max(decode["flops"], modelled) / 197e12, decode["hbm_floor"] / bandwidth)
    assert est["seconds/decode_step"] == pytest.approx(want, rel=1e-12)
    step = est["seconds/rollout"] + est["seconds/reference"] + est["seconds/train_step"]
    assert est["seconds/step"] == pytest.approx(step) and 0 < est["mfu"] < 1


def test_merged_reports_give_the_step_of_one_report(full):
    """Programs compiled in separate runs (`--merge`): the union gives the full report's step
    time and MFU; reports of different topologies are refused."""
    from visionr1_jax.tools import aot

    report, _ = full
    names = sorted(report["programs"])
    parts = [
        {**report, "programs": {k: report["programs"][k] for k in names[:2]}},
        {**report, "programs": {k: report["programs"][k] for k in names[2:]}},
    ]
    for part in parts:  # a part alone is not a step
        assert "mfu" not in aot.estimate(
            part["programs"], part["facts"], aot.CHIPS[part["device_kind"]], 1, part["devices"]
        )
    merged = aot.merge_reports(parts)
    assert merged["estimate"] == pytest.approx(report["estimate"])
    assert merged["fits"] == report["fits"] and set(merged["programs"]) == set(names)
    with pytest.raises(ValueError, match="reports differ in topology"):
        aot.merge_reports([parts[0], {**parts[1], "topology": "v5e:2x4"}])


def test_train_step_holds_the_sharded_state(full):
    report, _ = full
    facts, r = report["facts"], report["programs"]["train_step"]
    # f32 parameters + Adam's two moments + the reference copy: 16 bytes per trained parameter
    # (the vision tower is trained here), over 4 devices when every dimension divides, all of
    # it on each device at most (a dimension the mesh does not divide stays replicated).
    state = 16 * facts["trained"]
    assert state / 4 <= r["argument"] <= state + 2**20
    # The tool's account of the state per device from the shardings (SCALING.md's FSDP
    # table) is what the compiler holds as arguments, less the batch (well under 1 MiB here).
    sb = facts["state_bytes"]
    held = sb["params"] + sb["optimizer"] + sb["reference"] + sb["frozen"]
    assert held <= r["argument"] <= held + 2**20, (sb, r["argument"])
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
    # One program is not a step: no step time or MFU (it printed 167% for a train step alone).
    assert "mfu" not in master["estimate"] and "seconds/step" not in master["estimate"]
    assert "not every program of the step was compiled" in log
    copy_bytes = report["programs"]["decode_step"]["bytes_accessed"]
    master_bytes = master["programs"]["decode_step"]["bytes_accessed"]
    # The decoding step reads the text decoder's weights (not the vision tower's): in bf16
    # that is half the float32 bytes; the KV cache and activations read the same either way.
    f = report["facts"]
    text = f["params"] - f["vision"]
    assert copy_bytes < master_bytes
    assert master_bytes - copy_bytes >= 0.5 * (2 * text) / 4, (copy_bytes, master_bytes)
    # ...and the HBM floor (the roofline's): 2 bytes fewer per weight, over the 4 devices
    copy_floor = report["programs"]["decode_step"]["hbm_floor"]
    master_floor = master["programs"]["decode_step"]["hbm_floor"]
    assert master_floor - copy_floor >= 0.9 * (2 * text) / 4, (copy_floor, master_floor)


def test_lora_run_state_trains_the_adapters_only():
    """With `model.lora.rank` > 0 the tool's abstract run trains what `main` trains: the
    low-rank adapters, r x (in + out) per targeted projection of every decoder layer
    (regression: the abstract model was built without adapters, so the trained tree was empty
    and the optimizer state failed to build), sharded over the FSDP axis (regression: the
    adapter on a projection's tensor-parallel side was replicated); its train step with remat
    lowers. Nothing compiles here."""
    import jax

    from visionr1_jax import config_lib, sections
    from visionr1_jax.models import qwen_vl
    from visionr1_jax.tools import aot

    rank = 4
    c = config_lib.load_config(CONFIG)
    c.mesh = sections.mesh_config(ici=(1, 4, 1))
    hf, mesh = aot.architecture(c), aot.run_mesh(c, jax.devices()[:4])
    _, base = aot.lowered_programs(c, hf, mesh)
    c.model.lora.rank = rank
    c.model.remat_policy = "dots_no_batch"  # as configs/tpu_8_7b_lora.py
    programs, facts = aot.lowered_programs(c, hf, mesh)
    with jax.set_mesh(mesh):  # traces and lowers (regression: nnx.remat wrote the frozen base
        programs["train_step"]()  # back across trace levels under jax.grad, and failed)
    m = qwen_vl.QwenVLConfig.from_hf_dict(hf)
    h, inter, q, kv = m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads
    dims = {"q_proj": (h, q * m.head_dim), "k_proj": (h, kv * m.head_dim),
            "v_proj": (h, kv * m.head_dim), "o_proj": (q * m.head_dim, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip
    assert set(c.model.lora.targets) <= set(dims)
    adapters = m.num_layers * sum(rank * sum(dims[t]) for t in c.model.lora.targets)
    assert base["trained"] == base["params"]  # without LoRA every weight trains
    assert facts["trained"] == adapters > 0
    assert facts["params"] == base["params"] + adapters  # the base weights, frozen, and them
    # FSDP-sharded like the rest: each device holds a quarter of the (float32) adapters, and
    # Adam's moments of them; no adapter is replicated across the 4 devices.
    sb = facts["state_bytes"]
    assert sb["params"] == 4 * adapters / 4 and sb["frozen"] <= 1.1 * 4 * base["params"] / 4
    assert 2 * sb["params"] <= sb["optimizer"] <= 2 * sb["params"] + 64


def test_train_state_per_device_falls_as_1_over_the_fsdp_axis():
    """Parameters + optimizer state per device (the tool's account from the shardings, as in
    SCALING.md's table) fall as 1/N with the FSDP axis: at most 10% above the even share (the
    tiny model's few dimensions N does not divide stay whole). Abstract only."""
    import jax

    from visionr1_jax import config_lib, sections
    from visionr1_jax.tools import aot

    c = config_lib.load_config(CONFIG)
    hf = aot.architecture(c)
    held = {}
    for n in (1, 2, 4, 8):
        c.mesh = sections.mesh_config(ici=(1, n, 1))
        _, facts = aot.lowered_programs(c, hf, aot.run_mesh(c, jax.devices()[:n]))
        sb = facts["state_bytes"]
        held[n] = sb["params"] + sb["optimizer"]
        if n == 1:  # float32 weights and Adam's two float32 moments, whole (+ its step counts)
            assert 12 * facts["trained"] <= held[1] <= 12 * facts["trained"] + 64
    for n in (2, 4, 8):
        assert held[1] / n <= held[n] <= 1.1 * held[1] / n, (n, held)
