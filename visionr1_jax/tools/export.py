"""A training run's checkpoint as a Hugging Face checkpoint directory.

    python -m visionr1_jax.tools.export --workdir=/tmp/visionr1_demo --out=/tmp/demo_hf
    python -m visionr1_jax.tools.export --workdir=gs://BUCKET/run --step=1500 \\
        --out=/data/run_1500 --dtype=bfloat16

writes `config.json`, `model.safetensors`, `generation_config.json` and the processor files
(tokenizer, `preprocessor_config.json`, chat template) that
`transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out)` (`Qwen2VL...` for a
Qwen2-VL run) and `processing.load_processor(out)` read. Only the run's directory is needed:

1. **Step.** `--step`, or the newest complete (committed) checkpoint under
   `<workdir>/checkpoints` (checked first: a workdir without checkpoints or a step not saved
   is one line, `error: ...`, and exit status 2). The checkpoints are opened read-only: a run
   still training in that workdir keeps its in-flight save (a read-write orbax manager
   removes unfinished step directories when it opens).
2. **Config.** The run config saved in the checkpoint's `meta` gives the start checkpoint
   (`model.checkpoint`, or the run's `<workdir>/tiny_checkpoint`), the parameter dtype and
   which parameters were frozen (`model.freeze_vision_tower`).
3. **Parameters.** The model is built from the start checkpoint on one CPU device (the
   arrays go to host memory for writing anyway, and host memory holds a model that one
   accelerator might not); the trained parameters are read from the checkpoint's `state`
   (only they: not the optimizer state), the frozen ones (never saved) stay the start
   checkpoint's.
4. **Write.** `hf_weights.save_pretrained` (hub key layout; `--dtype`, default the
   parameters' dtype) and `processing.save_processor` of the start checkpoint's processor.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import flags, logging
from flax import nnx

from visionr1_jax import checkpoint, cli, loading, preflight, processing, sharding, state
from visionr1_jax.models import hf_weights, qwen_vl

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Restored:
    """A run's policy at a checkpoint: `model` (the trained parameters, the frozen ones from
    the start checkpoint), its `step`, the run `config` (from the checkpoint's meta) and the
    `start_checkpoint` directory (the processor's files)."""

    model: qwen_vl.QwenVL
    step: int
    config: ml_collections.ConfigDict
    start_checkpoint: str


def restore_policy(workdir: str, step: int | None = None) -> Restored:
    """The policy of the run in `workdir` at checkpoint `step` (None: the newest complete one),
    on one CPU device (see the module docstring, stages 1-3).

    Raises:
      FileNotFoundError: the workdir has no complete checkpoint.
      ValueError: no checkpoint of `step` (the message lists the saved steps).
    """
    manager = checkpoint.read_only_manager(workdir)
    try:
        steps = sorted(manager.all_steps())
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise ValueError(f"no checkpoint of step {step} in {manager.directory}; saved: {steps}")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if "config" not in meta:
            raise ValueError(f"checkpoint {step} in {manager.directory} has no run config")
        config = ml_collections.ConfigDict(dict(meta["config"]))
        start = loading.checkpoint_path(config, workdir)
        mesh = sharding.make_mesh((1, 1, 1), (1, 1, 1), devices=jax.devices("cpu")[:1])
        with jax.set_mesh(mesh):
            model = loading.load_model(config, start, mesh)
            graphdef, frozen, params = nnx.split(model, state.frozen_filter(config), ...)
            like = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
            )
            del model, params  # the start values of the trained parameters: freed before reading
            # Only the trained parameters (`checkpoint.load_params`, read-only): the checkpoint's
            # `state` also holds the optimizer state (twice their size for Adam).
            params, _ = checkpoint.load_params(workdir, step, like)
        return Restored(nnx.merge(graphdef, params, frozen), step, config, start)
    finally:
        manager.close()


def export(workdir: str, step: int | None, out: str, dtype: str | None = None) -> str:
    """Writes the policy of the run in `workdir` at checkpoint `step` (None: the newest) as a
    Hugging Face checkpoint directory `out` with the start checkpoint's processor files;
    `dtype` (`DTYPES`) of the weights on disk, None: the parameters' (`model.param_dtype`).
    Returns `out`."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {list(DTYPES)} or None")
    restored = restore_policy(workdir, step)
    # The processor files first: save_pretrained writes config.json last, which marks `out`
    # (local or remote) complete.
    processing.save_processor(processing.load_processor(restored.start_checkpoint), out)
    hf_weights.save_pretrained(
        restored.model, out, dtype=None if dtype is None else jnp.dtype(dtype)
    )
    return out


def define_flags() -> None:
    """The command line's flags (defined only when run as a program: `visionr1_jax.main`
    defines a `--workdir` of its own)."""
    flags.DEFINE_string("workdir", None, "The run's directory (local or gs://).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest complete one).")
    flags.DEFINE_string("out", None, "Output directory (the Hugging Face checkpoint).")
    flags.DEFINE_enum("dtype", None, DTYPES, "Weights dtype on disk (default: the params').")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise preflight.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    preflight.check_run(f.workdir, f.step, "--workdir", "--step")
    preflight.check_workdir("--out", f.out)
    logging.info("wrote %s", export(f.workdir, f.step, f.out, f.dtype))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
