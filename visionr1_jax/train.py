"""The training job: `run(config, workdir)` = `train_loop(setup(config, workdir))`.

The life cycle on one page (big_vision's `train.py`):

1. `setup`: validate the config, build the mesh, load the policy (`loading`), compile the
   train step for the first batch's shapes before the optimizer state and the reference
   exist (`step.make_train_step`, `step.update_shapes`), initialise or restore the state
   (`state.init_train_state`, `checkpoint.Checkpointer`), start the input pipeline.
2. `train_loop`: per batch one iteration (`grpo_iteration`: rollout → reference → μ updates;
   `sft_iteration`: one supervised update), then the evaluation every `eval.every` steps
   (`evaluate.evaluate`), the metrics rows (`metrics.Writer`), the renderings, the checks
   (non-finite steps, SIGTERM) and the saves (`save_checkpoint`).

What the loop holds is a `Job`: the compiled functions (`Programs`), the state, the I/O
(`IO`), and the step count on the host (the device's step is never read back implicitly:
every host-device transfer is an explicit `device_put`/`device_get`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from visionr1_jax import (
    checkpoint,
    config_lib,
    evaluate,
    fs,
    host,
    loading,
    processing,
    rollout,
    sampler,
    sft,
)
from visionr1_jax import metrics as metrics_lib
from visionr1_jax.data import pipeline
from visionr1_jax.models import qwen_vl
from visionr1_jax.sections.run import metrics_config
from visionr1_jax.state import (
    TrainState,
    frozen_filter,
    init_train_state,
    make_rollout_copy,
    shardings_of,
)
from visionr1_jax.step import (
    log_memory,
    make_logprob_fn,
    make_train_step,
    update_shapes,
)


@dataclasses.dataclass
class Programs:
    """The run's compiled functions and what they need.

    Attributes:
      graphdef: the model's static graph; `nnx.merge(graphdef, state.params, state.frozen)` is
        the policy.
      train_step: `step.make_train_step(graphdef, config, objective=config.objective)`.
      logprob_fn: `step.make_logprob_fn` (the reference's and μ > 1's old log-probs).
      rollout_copy: `state.make_rollout_copy(config)`: the weights the rollout samples from,
        made from the parameters once per rollout (None: the master weights).
      score_fn: `(host_batch, completions, step) -> per-row terms` of a rollout (default:
        `rollout.score_rows` with the run's reward); must give `reward/total` and `valid`.
      eos_ids: the checkpoint's stop ids (a completion without one at its end is truncated).
      memory: the GRPO train step's compiled `memory_analysis()` (empty for SFT).
    """

    graphdef: nnx.GraphDef
    train_step: Callable[..., Any]
    logprob_fn: Callable[..., jax.Array]
    rollout_copy: Callable[[Any], Any] | None
    score_fn: rollout.ScoreFn | None
    eos_ids: tuple[int, ...]
    memory: dict[str, Any]


@dataclasses.dataclass
class IO:
    """What the run reads and writes: `workdir`, the checkpoint's `processor`, the
    device-prefetching input pipeline `pipe`, the `checkpointer` (None without a `checkpoint`
    section), `resumed_from` (the checkpoint step resumed, None: a fresh start), `term`
    (the SIGTERM watch, installed first thing in `setup`) and `wandb_run_id` (the W&B run the
    resumed checkpoint logged to, kept in its meta; None: a new one if `metrics.wandb`)."""

    workdir: str
    processor: Any
    pipe: pipeline.DevicePrefetch
    checkpointer: checkpoint.Checkpointer | None
    resumed_from: int | None
    term: host.TermSignal
    wandb_run_id: str | None = None


@dataclasses.dataclass
class Job:
    """A training run in progress: its config, mesh, compiled `programs`, `state` (replaced
    after every update; the old one is donated), `io`, the optimizer `step` on the host, and
    the renderings not yet written (step -> {name: uint8[H, W, 3]})."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    programs: Programs
    state: TrainState
    io: IO
    step: int
    renderings: dict[int, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    @property
    def policy(self) -> qwen_vl.QwenVL:
        """The current policy as a module (shares the state's arrays)."""
        return nnx.merge(self.programs.graphdef, self.state.params, self.state.frozen)

    def sampling_policy(self) -> qwen_vl.QwenVL:
        """The policy the rollout samples from: `policy`, with its weight matrices copied to
        `model.dtype` first when `rollout_copy` is set (same tokens, fewer bytes per step)."""
        if self.programs.rollout_copy is None:
            return self.policy
        params, frozen = self.programs.rollout_copy((self.state.params, self.state.frozen))
        return nnx.merge(self.programs.graphdef, params, frozen)


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """The training job: `train_loop(setup(config, workdir))`. Returns the metrics rows."""
    return train_loop(setup(config, workdir))


def _load(config, path, mesh, objective):
    """The model at `path` and the abstract train state (nothing allocated beyond the model)."""
    with jax.set_mesh(mesh):
        model = loading.load_model(config, path, mesh)
        beta = 0.0 if objective == "sft" else None
        key = jax.random.key(int(config.seed))
        graphdef, abstract = init_train_state(model, config, key, beta=beta, abstract=True)
    return model, graphdef, abstract, key, beta


def _start_state(job_config, model, key, beta, mesh, resume, ckpt, abstract, workdir):
    """The train state to start from: `model.init_from`'s parameters (a fresh start), or the
    checkpoint `resume` (metrics after it are redone: their files are truncated). Returns the
    graph, the state and the resumed checkpoint's meta ({} on a fresh start)."""
    m = job_config.model
    if m.get("init_from") and resume is None:  # resuming: the checkpoint holds the reference
        _, _, start = nnx.split(model, frozen_filter(job_config), ...)
        loaded, at = checkpoint.load_params(m.init_from, m.get("init_step"), start)
        nnx.update(model, loaded)
        logging.info("initialised from %s (checkpoint step %d)", m.init_from, at)
    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(model, job_config, key, beta=beta)
    if shardings_of(state) != shardings_of(abstract):
        raise AssertionError("the train state's shardings differ from the compiled ones")
    meta = {}
    if resume is not None:
        restored = ckpt.restore(resume, state)
        state, meta = restored.state, restored.meta
        for name in ("metrics.jsonl", "rollouts.jsonl"):  # steps after it are redone
            metrics_lib.truncate_jsonl(fs.join(workdir, name), resume)
        logging.info("resuming from checkpoint step %d (%s)", resume, ckpt.directory)
    return graphdef, state, meta


def setup(config: ml_collections.ConfigDict, workdir: str) -> Job:
    """Validates the config, builds the mesh, loads the policy (and reference), the processor,
    the input pipeline and the reward; nothing is compiled before the config is validated."""
    config_lib.validate(config)
    term = host.TermSignal()
    objective = config.get("objective", "grpo")
    if objective == "grpo" and "reward" not in config:
        raise ValueError("objective='grpo' needs a `reward` section (sections.reward_config())")
    if jax.default_backend() == "cpu":
        host.keep_freed_memory()
    host.watch_compiles(release_memory=jax.default_backend() == "cpu")
    mesh = loading.make_run_mesh(config)
    path = loading.checkpoint_path(config, workdir)
    model, graphdef, abstract, key, beta = _load(config, path, mesh, objective)
    processor = processing.load_processor(path)
    ckpt = checkpoint.Checkpointer(workdir, config) if "checkpoint" in config else None
    resume = ckpt.latest_step() if ckpt is not None and config.checkpoint.resume else None
    inner = pipeline.InputPipeline(config.data, processor)
    if resume is not None:
        inner.set_state(ckpt.restore_data(resume))  # before the prefetch thread reads on
    pipe = pipeline.DevicePrefetch(inner, mesh)
    train_step = make_train_step(
        graphdef, config, objective=objective, state_sharding=shardings_of(abstract)
    )
    memory = {}
    if objective == "grpo":
        # Compiled before the optimizer state and the reference exist: XLA's working memory
        # (~0.6 GB for the tiny model on CPU) never coexists with them. The first batch's
        # shapes; the loop's call reuses the executable.
        with jax.set_mesh(mesh):
            shapes = update_shapes(config, mesh, pipe.peek().arrays)
            memory = log_memory("train_step", train_step, abstract, shapes)
    graphdef, state, meta = _start_state(
        config, model, key, beta, mesh, resume, ckpt, abstract, workdir
    )
    eos_ids, _ = sampler.default_token_ids(nnx.merge(graphdef, state.params, state.frozen))
    programs = Programs(
        graphdef=graphdef,
        train_step=train_step,
        logprob_fn=make_logprob_fn(graphdef, config),
        rollout_copy=make_rollout_copy(config) if objective == "grpo" else None,
        score_fn=None,
        eos_ids=eos_ids,
        memory=memory,
    )
    io = IO(workdir, processor, pipe, ckpt, resume, term, meta.get("wandb_run_id"))
    return Job(config, mesh, programs, state, io, step=int(jax.device_get(state.step)))


def grpo_iteration(job: Job, device_batch: Any) -> list[dict[str, Any]]:
    """One rollout and its μ updates (`grpo.num_iterations`); returns one metrics dict per
    optimizer step and leaves the new state in `job.state`.

    Stages: rollout (`rollout.rollout`: generate → decode → score → advantages) → [rollouts
    log, renderings] → reference log-probs (β > 0) → [old log-probs once, μ > 1] → μ train
    steps. Each phase is timed (`time/rollout`, `time/reward`, `time/reference`,
    `time/update`).
    """
    config, p, c = job.config, job.programs, job.config.grpo
    step = job.step
    score_fn = p.score_fn or (
        lambda hb, texts, at: rollout.score_rows(hb, texts, config.reward, at)
    )
    log_tokens = step // int(c.num_iterations) < int(config.get("log_rollouts", 0))
    with jax.set_mesh(job.mesh):
        out = rollout.rollout(
            job.sampling_policy(), device_batch, rng=job.state.rng, step=step, config=config,
            tokenizer=job.io.processor.tokenizer, eos_ids=p.eos_ids, score_fn=score_fn,
            gather_tokens=log_tokens,
        )  # fmt: skip
    times = {}
    if log_tokens:
        rollout.write_rollout(job.io.workdir, step, out.tokens, out.mask, out.rewards)
    render_every = int((config.get("metrics") or {}).get("render_every", 0) or 0)
    if render_every and step % render_every == 0:
        job.renderings[step] = rollout.render_rollout(
            config, job.io.processor, device_batch.host, out.completions, out.terms, step
        )
    mu = min(int(c.num_iterations), int(config.total_steps) - step)
    with jax.set_mesh(job.mesh):
        u, s = out.update, job.state
        as_rows = lambda x: jax.device_put(x, u.tokens.sharding)  # as the step compiled it
        t0 = time.perf_counter()  # reference log-probs (β > 0), once per rollout
        if float(c.beta) != 0:
            ref = p.logprob_fn(s.ref_params, s.frozen, u.prompts, u.tokens, u.mask)
            u = dataclasses.replace(u, ref_logps=as_rows(ref).block_until_ready())
        times["time/reference"] = time.perf_counter() - t0
        t0 = time.perf_counter()  # μ updates (μ > 1: the sampling policy's log-probs first)
        if int(c.num_iterations) > 1:
            old = p.logprob_fn(s.params, s.frozen, u.prompts, u.tokens, u.mask)
            u = dataclasses.replace(u, old_logps=as_rows(old))
        if not p.memory:
            p.memory = log_memory("train_step", p.train_step, job.state, u)
        step_metrics = []
        for _ in range(mu):
            job.state, m = p.train_step(job.state, u)
            step_metrics.append(m)
        step_metrics = jax.device_get(step_metrics)
    times["time/update"] = time.perf_counter() - t0
    job.step += mu
    common = {**out.metrics, **times}
    return [{**common, **{k: float(x) for k, x in m.items()}} for m in step_metrics]


def sft_iteration(job: Job, device_batch: Any) -> list[dict[str, Any]]:
    """One supervised update (`sft.sft_update`: the batch's answers as targets)."""
    update, extra = sft.sft_update(
        device_batch.host, device_batch.arrays, job.io.processor.tokenizer, job.config, job.step
    )
    with jax.set_mesh(job.mesh):
        job.state, m = job.programs.train_step(job.state, update)
    job.step += 1
    return [{**{k: float(v) for k, v in jax.device_get(m).items()}, **extra}]


def evaluate_now(config: ml_collections.ConfigDict, step: int) -> bool:
    """Whether the loop evaluates after optimizer step `step` (`eval.every`, and the last)."""
    every = int(config.eval.every) if "eval" in config else 0
    return bool(every) and (step % every == 0 or step == int(config.total_steps))


def evaluate_job(job: Job) -> dict[str, float]:
    """`evaluate.evaluate` of the current policy (the `eval` section: greedy answers on the
    evaluation split, the protocol's metrics and the reward's view of them), written to
    `<workdir>/eval/step_<N>.json`; returns `eval/<metric>` for the metrics row and
    `time/eval`."""
    t0 = time.perf_counter()
    tag = f"step_{job.step}"
    out, answers = evaluate.evaluate(job.policy, job.io.processor, job.config, job.mesh, tag=tag)
    evaluate.write_results(job.io.workdir, tag, out, answers, job.config, job.step)
    return {**{f"eval/{k}": v for k, v in out.items()}, "time/eval": time.perf_counter() - t0}


def train_loop(job: Job) -> list[dict[str, Any]]:
    """Runs `config.total_steps` optimizer steps of `config.objective`, writing each step's
    metrics (the keys are listed in `visionr1_jax.metrics`) to `<workdir>/metrics.jsonl`,
    TensorBoard (`metrics.tensorboard`) and W&B (`metrics.wandb`), and the renderings of
    `metrics.render_every`, under a progress bar; evaluates every `eval.every` steps.

    With a checkpointer (`config.checkpoint`) it saves every `checkpoint.every` steps and at
    the end (the seconds the loop was blocked by a save, `time/checkpoint`, are reported with
    the next step), and a SIGTERM (a preemption notice) makes it save after the current
    iteration and return (every process stops at the same step). `optim.max_bad_steps`
    non-finite steps in a row stop the run with an error, its last checkpoint intact.
    """
    config, io = job.config, job.io
    iteration = sft_iteration if config.get("objective", "grpo") == "sft" else grpo_iteration
    mc = config.get("metrics") or metrics_config()
    wandb_writer = metrics_lib.open_wandb(config, io.workdir, io.wandb_run_id)
    writer = metrics_lib.Writer(io.workdir, bool(mc.tensorboard), io.resumed_from, wandb_writer)
    total = int(config.total_steps)
    bar = metrics_lib.Progress(total, job.step, enabled=config.get("progress", True))
    rows: list[dict[str, Any]] = []
    bad = _BadSteps((config.get("optim") or {}).get("max_bad_steps", 3))
    saved_s = None
    try:
        while job.step < total:
            t0 = time.perf_counter()
            device_batch = next(io.pipe)
            t_data = time.perf_counter() - t0
            step_rows = iteration(job, device_batch)
            seconds = time.perf_counter() - t0
            if evaluate_now(config, job.step):
                step_rows[-1].update(evaluate_job(job))
            timing = {"time/data": t_data, "time/step": seconds / len(step_rows)}
            for m in _finish_rows(job, step_rows, timing, seconds, saved_s, bad):
                writer.write(m["step"], {k: v for k, v in m.items() if k != "step"})
                rows.append(m)
                if m["step"] in job.renderings:  # before the next step's row (W&B)
                    writer.images(m["step"], job.renderings.pop(m["step"]))
            saved_s = None
            for at, images in sorted(job.renderings.items()):
                writer.images(at, images)
            job.renderings.clear()
            bar.update(len(step_rows), rows[-1])
            bad.check(job)
            stop = io.term.received()
            if io.checkpointer is not None and (
                stop or job.step == total or io.checkpointer.should_save(job.step)
            ):
                t_save = time.perf_counter()
                save_checkpoint(job, rows[-1], writer)
                saved_s = time.perf_counter() - t_save  # the loop's blocked time (async save)
            if stop:
                if io.checkpointer is not None:
                    io.checkpointer.wait()
                logging.warning("SIGTERM: stopped after step %d (checkpoint saved)", job.step)
                break
    finally:
        io.term.restore()
        bar.close()
        writer.close()
        io.pipe.close()
        if io.checkpointer is not None:
            io.checkpointer.close()  # waits for the last save to commit
    if job.step >= total:
        logging.info("run finished: %d steps", job.step)  # scripts/tpu_pod.sh reads it
    return rows


class _BadSteps:
    """Counts optimizer steps whose loss or gradients held a NaN or Inf (each skipped by the
    step): `max_bad` in a row stop the run (`check`); None never stops."""

    def __init__(self, max_bad: int | None):
        self.max_bad, self.run, self.total = max_bad, 0, 0

    def count(self, row: dict[str, Any]) -> None:
        self.run = self.run + 1 if row.get("bad_step") else 0
        self.total += bool(row.get("bad_step"))

    def check(self, job: Job) -> None:
        if self.max_bad is None or self.run < self.max_bad:
            return
        ckpt = job.io.checkpointer
        last = ckpt.latest_step() if ckpt is not None else None
        raise FloatingPointError(
            f"{self.run} optimizer steps in a row (to step {job.step - 1}) had a NaN or Inf "
            f"in the loss or the gradients (optim.max_bad_steps={self.max_bad}); each was "
            "skipped, and the run stops here without saving. "
            + (f"The last checkpoint (step {last}) is intact." if last is not None
               else "No checkpoint was saved.")
        )  # fmt: skip


def _finish_rows(job, step_rows, timing, seconds, saved_s, bad) -> list[dict[str, Any]]:
    """The iteration's metrics rows as written: each with its step, the data and step seconds,
    the throughput, the pipeline's and compilation counts, the bad-step count, and on the
    first the seconds the previous save blocked the loop."""
    first = job.step - len(step_rows)
    data_counts = metrics_lib.sum_over_processes(job.io.pipe.metrics())
    compiles = sum(host.compile_counts().values())
    out = []
    for i, m in enumerate(step_rows):
        bad.count(m)
        m = {**m, **timing}
        if "completion/tokens" in m:
            m["throughput/tokens_per_s"] = m["completion/tokens"] / seconds
        if i == 0 and saved_s is not None:  # the save after the previous iteration
            m["time/checkpoint"] = saved_s
        m.update(data_counts, bad_steps_total=bad.total, compiles=compiles)
        out.append({"step": first + i, **m})
    return out


def save_checkpoint(
    job: Job, last_row: dict[str, Any], writer: metrics_lib.Writer | None = None
) -> None:
    """Saves the run at its current step (`checkpoint.Checkpointer.save`): the state, this
    host's pipeline position after the last batch consumed, the reward thresholds of the
    last rollout (`threshold/*` of its metrics, as the reward's schedule looked them up) and
    the run's W&B id (`writer.wandb_run_id` of process 0, whose meta is the one written, or
    the resumed checkpoint's), so that a resumed run continues the same W&B run.

    The `writer`'s rows are flushed to the workdir first (a remote workdir's files are
    uploaded), so that every step of a committed checkpoint is in its metrics files."""
    if writer is not None:
        writer.flush()
    meta = {"thresholds": {k: v for k, v in last_row.items() if k.startswith("threshold/")}}
    wandb_run_id = (writer.wandb_run_id if writer is not None else None) or job.io.wandb_run_id
    if wandb_run_id is not None:
        meta["wandb_run_id"] = wandb_run_id
    job.io.checkpointer.save(job.step, job.state, job.io.pipe.get_state(), meta)
