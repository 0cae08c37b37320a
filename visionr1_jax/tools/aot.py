"""Compiles a run's programs for a Cloud TPU topology without TPUs, and says whether they fit.

    make aot CONFIG=configs/tpu_v4_64.py TOPOLOGY=v4:4x4x2
    .venv-tpu/bin/python -m visionr1_jax.tools.aot --config=configs/tpu_v4_64.py \\
        --topology=v4:4x4x2 [--json=out.json] [--config.grpo.num_generations=8]
    .venv-tpu/bin/python -m visionr1_jax.tools.aot --merge=train.json,rest.json  # one step

Runs in the TPU venv (`requirements-tpu.txt`: libtpu compiles for any TPU topology on a CPU
machine). From the config alone (shapes, no weights, no data) it builds the abstract run state
on a mesh of the topology's devices (`config.mesh`) and compiles, as the run would:

- `rollout`: the sampler's whole program (prefill, then decoding with the full KV cache of
  `grpo.max_new_tokens`) for `data.batch_size` prompts x G, from the policy copy the loop
  samples from (`grpo.rollout_copy`);
- `prefill` and `decode_step`: its two phases alone, for their cost (XLA's cost analysis
  counts a loop body once, so the rollout's cost is prefill + L x one decoding step);
- `reference`: the reference log-probs of the B x G completions (beta > 0);
- `train_step`: the jitted update (`step.make_train_step`, state donated).

For each it prints per-device memory (`memory_analysis`: arguments, outputs, aliased,
temporaries, generated code and their peak = arguments + outputs - aliased + temporaries +
code, all in HBM; arguments in host memory, `grpo.reference_memory = "host"`, apart), FLOPs
and bytes accessed (`cost_analysis`, per device), and a roofline time: the larger of FLOPs
(XLA's or the model's, `model_flops`, the larger) / peak FLOP/s and the HBM floor / HBM
bandwidth of the chip (`CHIPS`); the floor (`hbm_floor`) is the traffic no schedule avoids,
arguments read and new outputs written once (XLA's bytes accessed count on-chip VMEM
traffic too, several times the HBM's for a decoding step's matmuls, and a scanned loop's
body once: printed, not used). The step estimate is
rollout (prefill + max_new_tokens decoding steps) + reference + mu train steps; MFU is the
model's FLOPs (`model_flops`, 2 per parameter per token forward, 6 for a trained token, plus
attention) over that time at the slice's peak. The available HBM per device is the compiler's
own figure (it refuses larger programs). A program fits when its peak plus the train state
that stays in HBM meanwhile without being one of its arguments (`resident_bytes`: the whole
state during the rollout, which reads a weight copy) is within the HBM less `--headroom`
(default 10%); exit status 1 when one does not, 0 otherwise.

Before compiling it prints the train state's bytes per device from the shardings alone
(trained parameters, optimizer state, reference, frozen weights; `state_bytes`): with
`--programs=` (none) that is all it does, in seconds, e.g. for a table over FSDP degrees.

v4 slices run in megacore mode (one device per chip, two TensorCores), as Cloud TPU runs them;
`--chip_config=default` exposes each TensorCore instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Shape-only work: never claim a real accelerator, and keep libtpu from probing for one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compilations side by side
# The TPU venv has no torch (shapes only): transformers would say so on import, twice.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags

from visionr1_jax import cli, config_lib, preflight, sampler, sharding
from visionr1_jax import state as state_lib
from visionr1_jax import step as step_lib
from visionr1_jax.models import hf_weights, presets, qwen_vl, tiny
from visionr1_jax.sections.model import data_max_patches, lora_options, max_image_patches
from visionr1_jax.sections.training import rollout_dtype

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip peaks: dense bf16 FLOP/s and HBM bandwidth (bytes/s)."""

    flops: float
    hbm_bandwidth: float
    cores: int  # TensorCores per chip


# Cloud TPU system architecture pages (v4: 275 TFLOP/s, 1,228 GB/s; v5e: 197, 819; v5p: 459,
# 2,765; v6e: 918, 1,640), keyed by jax's `device_kind`.
CHIPS = {
    "TPU v4": Chip(275e12, 1228e9, 2),
    "TPU v5 lite": Chip(197e12, 819e9, 1),
    "TPU v5": Chip(459e12, 2765e9, 2),
    "TPU v6 lite": Chip(918e12, 1640e9, 1),
}
PROGRAMS = ("rollout", "prefill", "decode_step", "reference", "train_step")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:2x2, v4:4x4x2.")
_CHIP_CONFIG = flags.DEFINE_string(
    "chip_config", None, "libtpu chip config: megacore (v4 default) or default."
)
_ARCH = flags.DEFINE_string(
    "architecture",
    None,
    f"One of {sorted(presets.ARCHITECTURES)} when model.checkpoint's config.json cannot be read "
    "and its name is not a release's.",
)
_PROGRAMS = flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile ({PROGRAMS}).")
_HEADROOM = flags.DEFINE_float("headroom", 0.1, "HBM fraction that must stay free.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
_MERGE = flags.DEFINE_list(
    "merge",
    [],
    "JSON reports of one run and topology, each with some of the programs: print the step's "
    "roofline from all of them, a program in several taken from the last (nothing is "
    "compiled; --config and --topology not needed).",
)


# ------------------------------------------------------------------------------- topology


def topology_devices(name: str, chip_config: str | None = None) -> list[Any]:
    """The abstract devices of TPU topology `name` (`v5e:2x2`, `v4:4x4x2`, ...); v4 in
    megacore mode unless `chip_config` says otherwise."""
    kind = name.split(":")[0]
    kw: dict[str, Any] = {}
    chip_config = chip_config or ("megacore" if kind == "v4" else None)
    if chip_config and chip_config != "default":
        kw["chip_config_name"] = chip_config
        dims = [int(d) for d in name.split(":")[1].split("x")]
        # one host per 2x2x1 chips (4 chips a host), as a Cloud TPU VM slice
        kw["chips_per_host_bounds"] = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1), strict=True))
        kw["num_slices"] = 1
    return list(topologies.get_topology_desc(name, "tpu", **kw).devices)


def available_hbm(devices: list[Any]) -> int:
    """Bytes of HBM a program may use per device, as the TPU compiler states it: it is read
    from the error of a program that cannot fit ("exceeds available HBM (15.75G)")."""
    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",))
    big = jax.ShapeDtypeStruct((1 << 17, 1 << 20), jnp.float32, sharding=_replicated(mesh))
    try:
        jax.jit(lambda a: a * 2).lower(big).compile()
    except Exception as e:  # the compiler's message is what we want
        found = re.search(r"available HBM \(([\d.]+)([KMGT])\)", str(e))
        if found:
            return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)
        raise
    raise RuntimeError("a 512 GiB program compiled: not a TPU topology?")


def _replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def run_mesh(config: ml_collections.ConfigDict, devices: list[Any]) -> jax.sharding.Mesh:
    """`config.mesh` over the topology's devices (every device, as on the slice)."""
    ici = list(config.mesh.ici_parallelism)
    dcn = list(config.mesh.dcn_parallelism)
    try:
        return sharding.make_mesh(ici, dcn, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        if -1 in ici:
            ici[ici.index(-1)] = len(devices) // -int(np.prod(ici))
        shape = tuple(i * d for i, d in zip(ici, dcn, strict=True))
        types = (jax.sharding.AxisType.Auto,) * len(shape)
        arr = np.array(devices).reshape(shape)
        return jax.sharding.Mesh(arr, sharding.MESH_AXES, axis_types=types)


# ---------------------------------------------------------------------------- abstract run


def architecture(config: ml_collections.ConfigDict, name: str | None = None) -> dict[str, Any]:
    """The checkpoint's `config.json` as a dict: `name` (a `presets.ARCHITECTURES` key) when
    given; else the tiny config when `model.checkpoint` is empty; else the release the
    checkpoint's directory is named after (`.../Qwen2.5-VL-7B-Instruct`); else the
    checkpoint's own file."""
    m = config.model
    if name:
        if name not in presets.ARCHITECTURES:
            raise ValueError(f"--architecture={name!r}: one of {sorted(presets.ARCHITECTURES)}")
        return presets.ARCHITECTURES[name]
    if not m.checkpoint:
        return tiny.hf_config_dict(m.tiny, m.tokenizer)
    release = presets.from_checkpoint_name(str(m.checkpoint))
    if release is not None:
        return presets.ARCHITECTURES[release]
    try:
        return json.loads((epath.Path(str(m.checkpoint)) / "config.json").read_text())
    except Exception as e:  # unreadable here (no credentials, no copy)
        raise ValueError(
            f"cannot read {m.checkpoint}/config.json ({type(e).__name__}); pass --architecture "
            f"(one of {sorted(presets.ARCHITECTURES)})"
        ) from None


def abstract_model(
    config: ml_collections.ConfigDict, hf_config: Mapping[str, Any], mesh: jax.sharding.Mesh
) -> qwen_vl.QwenVL:
    """The run's model with `jax.ShapeDtypeStruct` parameters carrying the shardings
    `hf_weights.from_pretrained` gives the real ones on `mesh` (nothing allocated)."""
    m = config.model
    lora = lora_options(config)  # `model.lora`: the adapters the run trains
    cfg = qwen_vl.QwenVLConfig.from_hf_dict(
        dict(hf_config),
        param_dtype=jnp.dtype(m.param_dtype),
        dtype=jnp.dtype(m.dtype),
        remat_policy=m.remat_policy,
        scan_layers=bool(m.get("scan_layers", False)),
        max_image_patches=max_image_patches(config),
        **{k: v for k, v in lora.items() if k != "lora_seed"},
    )
    graphdef, state = nnx.split(hf_weights.abstract_model(cfg))
    rules = cfg.logical_axis_rules

    def place(var):
        x = var.get_value()
        sh = sharding.named_sharding(mesh, var.get_metadata().get("logical_axes"), rules, x.shape)
        var.set_value(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh))

    for _, var in nnx.to_flat_state(state):
        place(var)
    return nnx.merge(graphdef, state)


def abstract_batch(
    config: ml_collections.ConfigDict, cfg: qwen_vl.QwenVLConfig, mesh: jax.sharding.Mesh
) -> dict[str, jax.ShapeDtypeStruct]:
    """The input pipeline's global batch at its largest buckets (`pipeline` docstring): B =
    `data.batch_size` rows sharded like the pipeline's, T the longest prompt bucket, S the
    largest patch bucket, N = `data.max_instances`, pixels as `global_arrays` hands them on."""
    d = config.data
    b = int(d.batch_size)
    t = max(tuple(d.length_buckets) or (int(d.max_prompt_len),))
    s = max(tuple(d.patch_buckets) or (int(data_max_patches(d)),))
    n = int(d.max_instances or 32)
    rows = sharding.rows_sharding(mesh)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
    return {
        "input_ids": sds((b, t), jnp.int32),
        "attention_mask": sds((b, t), jnp.int32),
        "pixel_values": sds((b, s, cfg.patch_dim), jnp.float32),
        "image_grid_thw": sds((b, 3), jnp.int32),
        "gt_boxes": sds((b, n, 4), jnp.float32),
        "gt_classes": sds((b, n), jnp.int32),
        "gt_mask": sds((b, n), jnp.bool_),
        "image_size": sds((b, 2), jnp.int32),
        "input_size": sds((b, 2), jnp.int32),
        "valid": sds((b,), jnp.bool_),
    }


def _abstract(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Concrete leaves (the state's step counter and key) as replicated abstract values."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct) or x is None:
            return x
        return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=_replicated(mesh))

    return jax.tree.map(one, tree)


# ------------------------------------------------------------------------------ programs


def _rollout_programs(rollout_model, batch, cfg, c, key, big_l: int, mesh) -> dict[str, Callable]:
    """Thunks lowering the rollout's programs: the whole rollout (`sampler.lower`), its
    prefill, and one decoding step of the B x G rows."""
    g = int(c.num_generations)
    b, t = batch["input_ids"].shape
    sample_kwargs = dict(
        rng=key, num_generations=g, max_new_tokens=int(c.max_new_tokens),
        temperature=float(c.temperature), top_k=int(c.top_k), top_p=float(c.top_p),
    )  # fmt: skip
    sampler_batch = dict(batch)
    ts = sampler.bucket(t, sampler.PROMPT_BUCKETS)
    if ts != t:
        sh = batch["input_ids"].sharding
        for k in ("input_ids", "attention_mask"):
            sampler_batch[k] = jax.ShapeDtypeStruct((b, ts), jnp.int32, sharding=sh)

    def rollout():
        return sampler.lower(rollout_model(), sampler_batch, **sample_kwargs)

    def prefill():
        gd, st = nnx.split(rollout_model())
        ids, mask = sampler_batch["input_ids"], sampler_batch["attention_mask"]
        pixels, grid = sampler_batch["pixel_values"], sampler_batch["image_grid_thw"]
        fn = lambda st, *a: sampler.prefill(nnx.merge(gd, st), *a)
        return jax.jit(fn).lower(st, ids, mask, pixels, grid)

    def decode_step():
        """One decoding step of the B x G rows attending to the full prompt and completion
        caches (the last step of a `max_new_tokens` rollout), logits included."""
        gd, st = nnx.split(rollout_model())
        r = b * g
        rows = sharding.rows_sharding(mesh)
        sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
        cache = lambda n, length: [
            {k: sds((n, length, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16) for k in "kv"}
            for _ in range(cfg.num_layers)
        ]

        def step(st, tok, pos, prompt_kv, valid, gen_kv):
            m = nnx.merge(gd, st)
            idx = jnp.int32(big_l - 1)
            h, gen_kv = sampler.decode_step(m, tok, pos, prompt_kv, valid, gen_kv, idx)
            return m.logits(h), gen_kv

        pos = jax.ShapeDtypeStruct((3, r, 1), jnp.int32, sharding=_replicated(mesh))
        return jax.jit(step, donate_argnums=5).lower(
            st, sds((r,), jnp.int32), pos, cache(b, ts), sds((b, ts), jnp.bool_), cache(r, big_l)
        )

    return {"rollout": rollout, "prefill": prefill, "decode_step": decode_step}


def lowered_programs(
    config: ml_collections.ConfigDict, hf_config: Mapping[str, Any], mesh: jax.sharding.Mesh
) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """Thunks lowering each of `PROGRAMS` for the run on `mesh`, and the facts the estimate
    needs (parameter counts, tokens)."""
    c = config.grpo
    g = int(c.num_generations)
    objective = config.get("objective", "grpo")
    beta = 0.0 if objective == "sft" else float(c.beta)
    # Outside `jax.set_mesh`: eager operations (the state's step counter) stay on the CPU.
    model = abstract_model(config, hf_config, mesh)
    cfg = model.cfg
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=_replicated(mesh))
    graphdef, state = state_lib.init_train_state(model, config, key, beta=beta, abstract=True)
    state = _abstract(state, mesh)
    batch = abstract_batch(config, cfg, mesh)
    b, t = batch["input_ids"].shape
    big_l = sampler.completion_width(int(c.max_new_tokens))
    rollout_params, rollout_frozen = state_lib.rollout_shapes_of(
        config, (state.params, state.frozen)
    )

    rollout_model = lambda: nnx.merge(graphdef, rollout_params, rollout_frozen)
    programs = _rollout_programs(rollout_model, batch, cfg, c, key, big_l, mesh)
    with jax.set_mesh(mesh):
        update = step_lib.update_shapes(config, mesh, batch)

    def reference():
        fn = step_lib.make_logprob_fn(graphdef, config)
        ref = state.ref_params if state.ref_params is not None else state.params
        return fn.lower(ref, state.frozen, update.prompts, update.tokens, update.mask)

    def train_step():
        step = step_lib.make_train_step(
            graphdef, config, objective=objective, state_sharding=state_lib.shardings_of(state)
        )
        return step.lower(state, update)

    programs |= {"reference": reference, "train_step": train_step}
    if beta == 0:
        programs.pop("reference")
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    held = state_bytes(state)
    facts = dict(
        params=count(state.params) + count(state.frozen),
        trained=count(state.params),
        vision=count(nnx.state(model.visual)),
        embedding=cfg.vocab_size * cfg.hidden_size,
        batch=b, prompt_len=t, patches=int(batch["pixel_values"].shape[1]),
        generations=g, completion_len=big_l, max_new_tokens=int(c.max_new_tokens),
        num_iterations=int(c.num_iterations),
        layers=cfg.num_layers, hidden=cfg.hidden_size, tied=bool(cfg.tie_word_embeddings),
        lora=cfg.lora_rank > 0, state_bytes=held, reference=beta > 0,
        resident=resident_bytes(held, rollout_dtype(config) is not None,
                                state.ref_params is not None),
    )  # fmt: skip
    return programs, facts


def resident_bytes(sb: Mapping[str, float], copy: bool, has_ref: bool) -> dict[str, float]:
    """Bytes per device of the train state that stay in HBM while each program runs without
    being its argument (the compiler's peak leaves them out): all of it during the rollout's
    programs when they read a weight copy (else all but the parameters they read), the policy
    and its optimizer state during the reference pass, none in the train step (its
    arguments)."""
    total = sb["params"] + sb["optimizer"] + sb["reference"] + sb["frozen"]
    sampled = 0.0 if copy else sb["params"] + sb["frozen"]
    ref_args = sb["frozen"] + (sb["reference"] if has_ref else sb["params"])
    rollout = total - sampled
    return dict(rollout=rollout, prefill=rollout, decode_step=rollout,
                reference=total - ref_args, train_step=0.0)  # fmt: skip


def state_bytes(state: state_lib.TrainState) -> dict[str, float]:
    """Bytes per device of each part of the abstract train state, from the shardings alone
    (the shard each device holds; a leaf the mesh does not divide counts whole): `params`
    (trained), `optimizer` (its state), `reference`, `frozen`; the parts in host memory
    (`grpo.reference_memory = "host"`) under `host`."""

    def one(tree: Any) -> tuple[float, float]:
        device = host = 0.0
        for x in jax.tree.leaves(tree):
            sh = getattr(x, "sharding", None)
            shape = sh.shard_shape(x.shape) if sh is not None else x.shape
            n = math.prod(shape) * jnp.dtype(x.dtype).itemsize
            if sh is not None and getattr(sh, "memory_kind", None) == "pinned_host":
                host += n
            else:
                device += n
        return device, host

    parts = {"params": state.params, "optimizer": state.opt_state,
             "reference": state.ref_params, "frozen": state.frozen}  # fmt: skip
    out, host = {}, 0.0
    for name, tree in parts.items():
        out[name], h = one(tree)
        host += h
    out["host"] = host
    return out


# ---------------------------------------------------------------------------------- report


def analyse(compiled: Any) -> dict[str, float]:
    """Per-device memory (bytes) and cost of a compiled program."""
    mem = compiled.memory_analysis()
    out = {
        k: float(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
        for k in ("argument", "output", "alias", "temp", "generated_code", "host_argument")
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["peak"] += out["generated_code"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    out["flops"] = float(cost.get("flops", 0.0))
    out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    out["hbm_floor"] = hbm_floor(out)
    return out


def hbm_floor(r: Mapping[str, float]) -> float:
    """The HBM traffic a program cannot avoid, per device: every HBM argument read once and
    every output not written in place (aliased to a donated argument) written once.

    The roofline's memory term. XLA's `bytes accessed` is no bound: on TPU it counts on-chip
    memory traffic too (a weight prefetched into VMEM counts at its copy, at the bitcast of
    the copy and at the matmul reading it: 5.1x the weight's bytes for a [64, 448] x
    [448, 18944] bf16 matmul on v5e), and a loop body once (`lax.scan` over layers)."""
    return r["argument"] + r["output"] - r["alias"]


def model_flops(facts: Mapping[str, Any]) -> dict[str, float]:
    """FLOPs of one GRPO step over the whole slice, from the architecture: 2 per weight per
    token forward, 3x that for a trained token (forward + both backward matmuls), attention
    (2 x 2 x layers x hidden x context per token and pass) and the vision tower's patches
    (forward only in the rollout and the reference; trained in the update unless frozen).
    Under LoRA 2x (forward + the activations' gradient: the frozen base weights get none).
    Also the rollout's two phases: `prefill` (prompts and images) and `decode_step` (one
    step of the B x G rows at the full cache): XLA counts a scanned vision tower's body once."""
    b, g, t, big_l = (
        facts["batch"],
        facts["generations"],
        facts["prompt_len"],
        facts["max_new_tokens"],
    )
    # the decoder's matmul weights and the output head (a tied head is the embedding table)
    text = facts["params"] - facts["vision"] - (0 if facts["tied"] else facts["embedding"])
    attn = lambda context: 4 * facts["layers"] * facts["hidden"] * context
    vision = 2 * facts["vision"] * facts["patches"] * b
    prefill = 2 * text * b * t + attn(t / 2) * b * t + vision
    rollout = prefill + (2 * text + attn(t + big_l / 2)) * b * g * big_l
    last_step = (2 * text + attn(t + big_l)) * b * g  # one decoding step at the full cache
    scored = b * (t + g * big_l)  # prompt + completions, teacher-forced
    forward = 2 * text * scored + attn((t + big_l) / 2) * scored + vision
    trained_vision = facts["trained"] > facts["params"] - facts["vision"]
    train_ = 3 * forward if trained_vision else 3 * (forward - vision) + vision
    if facts.get("lora"):  # frozen base weights: the backward pass computes no weight gradient
        train_ = 2 * (forward - vision) + vision
    return dict(
        rollout=rollout, prefill=prefill, decode_step=last_step, reference=forward,
        train_step=train_,
    )  # fmt: skip


def estimate(
    results: Mapping[str, Mapping[str, float]],
    facts: Mapping[str, Any],
    chip: Chip,
    per_chip_devices: int,
    n_devices: int,
) -> dict[str, float]:
    """Roofline seconds per program, and per GRPO step with the step's MFU when every program
    of the step was compiled (prefill, decode_step, the reference when β > 0, train_step)."""
    flops = chip.flops / per_chip_devices
    bandwidth = chip.hbm_bandwidth / per_chip_devices
    model = model_flops(facts)
    seconds = {}
    for name, r in results.items():
        if "flops" not in r or name == "rollout":  # its loop body is counted once: below
            continue
        xla = r["flops"]
        modelled = model.get(name, 0.0) / n_devices
        seconds[name] = max(max(xla, modelled) / flops, hbm_floor(r) / bandwidth)
    out = {f"seconds/{k}": v for k, v in seconds.items()}
    if "prefill" in seconds and "decode_step" in seconds:
        out["seconds/rollout"] = (
            seconds["prefill"] + facts["max_new_tokens"] * seconds["decode_step"]
        )
    parts = ["seconds/rollout", "seconds/train_step"]
    parts += ["seconds/reference"] if facts.get("reference", True) else []
    if any(p not in out for p in parts):
        return out
    step = out["seconds/rollout"] + out.get("seconds/reference", 0.0)
    step += facts["num_iterations"] * out["seconds/train_step"]
    out["seconds/step"] = step
    total = model["rollout"] + facts["num_iterations"] * model["train_step"]
    total += model["reference"] if facts.get("reference", True) else 0.0
    out["model_flops/step"] = total
    out["mfu"] = total / (step * flops * n_devices)
    return out


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def report(
    config: ml_collections.ConfigDict,
    topology: str,
    *,
    chip_config: str | None = None,
    architecture_name: str | None = None,
    programs: tuple[str, ...] = PROGRAMS,
    headroom: float = 0.1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compiles `programs` of run `config` for `topology` and returns the report (see the
    module docstring); `report["fits"]` is False when one does not fit."""
    config_lib.validate(config)
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"unknown programs {unknown}; known: {PROGRAMS}")
    devices = topology_devices(topology, chip_config)
    kind = devices[0].device_kind
    chip = CHIPS.get(kind)
    if chip is None:
        raise ValueError(f"no peak figures for {kind!r}; known: {sorted(CHIPS)}")
    per_chip = chip.cores // max(int(getattr(devices[0], "num_cores", 1) or 1), 1)
    hbm = available_hbm(devices)
    mesh = run_mesh(config, devices)
    hf_config = architecture(config, architecture_name)
    thunks, facts = lowered_programs(config, hf_config, mesh)
    log(
        f"{topology}: {len(devices)} devices ({kind}, {chip.cores // per_chip} core(s) each), "
        f"{hbm / GiB:.2f} GiB HBM per device; mesh {dict(mesh.shape)}; "
        f"{facts['params'] / 1e9:.2f}B parameters ({facts['trained'] / 1e9:.2f}B trained); "
        f"B={facts['batch']} G={facts['generations']} T={facts['prompt_len']} "
        f"S={facts['patches']} L={facts['completion_len']}"
    )
    sb = facts["state_bytes"]
    log(
        f"  train state per device (from the shardings): params {_size(sb['params'])} + "
        f"optimizer {_size(sb['optimizer'])} + reference {_size(sb['reference'])} + frozen "
        f"{_size(sb['frozen'])}" + (f"; in host memory {_size(sb['host'])}" if sb["host"] else "")
    )
    results: dict[str, dict[str, Any]] = {}
    for name in programs:
        if name in thunks:
            results[name] = _compile_program(name, thunks[name], mesh, facts, hbm, headroom, log)
    est = estimate(results, facts, chip, per_chip, len(devices))
    fits = all(r["fits"] for r in results.values())
    _log_estimate(est, results, fits, headroom, log)
    return dict(
        topology=topology, devices=len(devices), device_kind=kind, hbm_bytes=hbm,
        mesh=dict(mesh.shape), facts=facts, programs=results, estimate=est, fits=fits,
        per_chip_devices=per_chip,
    )  # fmt: skip


def _compile_program(name, thunk, mesh, facts, hbm: float, headroom: float, log) -> dict:
    """Compiles one program (`thunk()` lowers it) and returns its analysis (`analyse`) with
    the train state held beside it (`resident`) and whether both fit in `hbm` less
    `headroom`; a program the compiler refuses for memory is reported as not fitting."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        try:
            compiled = thunk().compile()
        except Exception as e:  # the compiler refuses programs that do not fit
            found = re.search(r"Ran out of memory[^\n]*", str(e))
            if found is None:
                raise
            log(f"  {name:<12} DOES NOT FIT: {found.group(0)}")
            return {"fits": False, "error": found.group(0)}
    r = analyse(compiled)
    r["compile_seconds"] = time.perf_counter() - t0
    r["resident"] = float(facts["resident"].get(name, 0.0))
    r["fits"] = r["peak"] + r["resident"] <= (1.0 - headroom) * hbm
    log(
        f"  {name:<12} peak {_size(r['peak'])} ({100 * r['peak'] / hbm:5.1f}%) = args "
        f"{_size(r['argument'])} + out {_size(r['output'])} - alias {_size(r['alias'])} "
        f"+ temp {_size(r['temp'])} + code {_size(r['generated_code'])}; "
        f"{r['flops']:.3g} FLOP; HBM floor {_size(r['hbm_floor'])} (XLA: "
        f"{_size(r['bytes_accessed'])} accessed, VMEM included)"
        + (
            f"; with the train state held meanwhile {_size(r['peak'] + r['resident'])} "
            f"({100 * (r['peak'] + r['resident']) / hbm:.1f}%)"
            if r["resident"]
            else ""
        )
        + (f"; host memory args {_size(r['host_argument'])}" if r["host_argument"] else "")
        + ("" if r["fits"] else f"  DOES NOT FIT with {headroom:.0%} headroom")
        + f" [{r['compile_seconds']:.0f} s]"
    )
    return r


def _log_estimate(est, results, fits: bool, headroom: float, log) -> None:
    """The roofline lines of a report."""
    if not results:
        log("  no program compiled (--programs is empty)")
        return
    for k, v in est.items():
        if k.startswith("seconds/"):
            log(f"  roofline {k[8:]:<12} {v:.4g} s")
    if "mfu" in est:
        log(f"  step model FLOPs {est['model_flops/step'] / 1e15:.2f} PFLOP; MFU at the "
            f"roofline {100 * est['mfu']:.1f}%")  # fmt: skip
    else:
        log("  step time and MFU: not every program of the step was compiled")
    log(f"  {'fits' if fits else 'DOES NOT FIT'} ({headroom:.0%} headroom)")


def merge_reports(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One report from several of the same run and topology (programs compiled in separate
    processes, e.g. a slow train step alone), with the step's roofline over all of them; a
    program in several reports is taken from the last. Raises when they differ in topology,
    mesh or run facts."""
    first = reports[0]
    keys = ("topology", "devices", "device_kind", "mesh", "facts")
    for other in reports[1:]:
        for k in keys:
            a, b = first[k], other[k]
            if k == "facts":  # the facts both have (an older report may lack a newer one)
                a, b = ({f: d[f] for f in first[k].keys() & other[k].keys()} for d in (a, b))
            if a != b:
                raise ValueError(f"reports differ in {k}: {a!r} vs {b!r}")
    programs: dict[str, Any] = {}
    for r in reports:
        programs.update(r["programs"])
    per_chip = int(first.get("per_chip_devices", 1))
    est = estimate(
        programs, first["facts"], CHIPS[first["device_kind"]], per_chip, first["devices"]
    )
    fits = all(r["fits"] for r in programs.values())
    return {**first, "programs": programs, "estimate": est, "fits": fits}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise preflight.UsageError(f"unexpected arguments: {argv[1:]}")
    if _MERGE.value:
        reports = []
        for path in _MERGE.value:
            with open(path, encoding="utf-8") as f:
                reports.append(json.load(f))
        out = merge_reports(reports)
        for name, r in out["programs"].items():
            used = r["peak"] + r.get("resident", 0.0)
            print(f"  {name:<12} peak {_size(r['peak'])}, with the state held {_size(used)} "
                  f"({100 * used / out['hbm_bytes']:.1f}%)")  # fmt: skip
        for k, v in out["estimate"].items():
            print(f"  {k:<24} {v:.4g}")
    else:
        if _CONFIG.value is None or not _TOPOLOGY.value:
            raise preflight.UsageError("--config and --topology are required (or --merge)")
        preflight.validate(_CONFIG.value)  # shapes only: no path of the config is read
        out = _report_from_flags()
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=float)
    sys.exit(0 if out["fits"] else 1)


def _report_from_flags() -> dict[str, Any]:
    return report(
        _CONFIG.value,
        _TOPOLOGY.value,
        chip_config=_CHIP_CONFIG.value,
        architecture_name=_ARCH.value,
        programs=tuple(_PROGRAMS.value),
        headroom=_HEADROOM.value,
    )


if __name__ == "__main__":
    cli.run(main)
