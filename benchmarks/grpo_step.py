"""Complete GRPO steps per second: our loop (`train.run`) vs TRL's `GRPOTrainer`, CPU.

A step is everything between two optimizer updates: the next batch of prompts, the rollout
(G sampled completions per prompt), the reward, the reference model's log-probs (β = 0.04),
the policy's log-probs and the AdamW update (μ = 1). Both sides train the same local tiny
Qwen2.5-VL checkpoint (`models.tiny.write_tiny_checkpoint`, random weights) on the same
prompts, in the same order:

* data: the `synthetic_shapes` detection records (112x112 images, 1–3 shapes), read in file
  order (no shuffling on either side), B prompts per step, G completions each;
* completion length: every completion runs exactly `--new` tokens on both sides. TRL:
  `generation_kwargs={"min_new_tokens": new}` (transformers sets the EOS logits to -inf
  until then, so no EOS is ever sampled); ours: the child wraps `sampler.generate`, which
  `train.run` calls once per step, with `eos_token_id=()` (no row stops) and the stop ids
  added to `suppress_token_ids` (their logits are -inf, as TRL's). Each child checks that
  every step's B·G completions had `new` tokens;
* sampling: temperature 1, top-k 50, top-p 1 (the Vision-R1 settings); the vision special
  tokens (`<|image_pad|>`, `<|video_pad|>`, `<|vision_start|>`, `<|vision_end|>`) are never
  sampled on either side (TRL: `suppress_tokens`);
* reward: the Vision-R1 official reward (dual format + recall + precision, ξ0 = 0.5, no rule
  schedule). TRL: three python reward functions, as the released code registers them, each
  computing its term the way the reference does (`tests/reward_reference.py`: json / regex
  parse, box-prior cost, scipy Hungarian, GIoU); ours: host parse + the jitted reward;
* GRPO: advantages (r − mean) / (std + 1e-4) per group, k3 KL with β = 0.04 against a frozen
  reference copy of the initial weights, per-sequence token mean (TRL `loss_type="grpo"`);
* optimizer: AdamW lr 1e-6 (linear decay), weight decay 0, global-norm clip 1.0;
* 2 threads each (torch `set_num_threads(2)`, XLA intra-op 2), `OMP_WAIT_POLICY=PASSIVE`.

Each run is its own process (so that its peak resident memory, VmHWM, is its own); the parent
alternates whole runs (ours, TRL, ours, TRL, ...) so that load from other processes on a shared
machine hits both alike. Each run trains `--steps` steps; the first `--warmup` steps (our
compilation, TRL's first-call costs) are not timed. A step's time: ours, the loop's own
`time/step` (data + rollout + reward + update, written to metrics.jsonl); TRL, the wall time
between consecutive `on_step_end` callbacks (data + generation + reward + reference and policy
log-probs + update + logging). Per run the median of the timed steps (robust to a one-off
recompilation: our reward compiles once per new ground-truth width). Reported per vocabulary:
steps/s of each side's best run, the ratio of the best runs and the median of the per-round
ratios, our phases (rollout / reward / reference / update), and each process's peak resident memory
(VmHWM over the whole run: imports, compilation and steps; the larger of the rounds).

Our side runs the plain GRPO job of `configs/demo_cpu.py:experiment=False` with the settings
above. `--smoke` (the test suite runs it: tests/test_bench_grpo_step.py) checks that both sides
still run and the table still prints, nothing more: one round of one step per side (no
warm-up: its time includes the compilation), small vocabulary, B x G = 1 x 2 completions of 4
tokens, 8 training images.

    .venv/bin/python benchmarks/grpo_step.py                      # small and real vocabulary
    .venv/bin/python benchmarks/grpo_step.py --vocab small --rounds 3 --steps 12
    .venv/bin/python benchmarks/grpo_step.py --smoke              # does it still run? (<1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# torch's OpenMP threads otherwise spin at barriers on a shared machine (see sampler.py);
# passive waiting only helps the baseline, XLA does not use OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES_CONFIG = "detection"  # synthetic_shapes' registered config (4,096 training images)
SMOKE_SHAPES_CONFIG = "smoke"  # the same images' recipe, 8 of them (`--smoke`)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # configs/demo_cpu.py's resize bounds


# ------------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """VmHWM of this process (MB): its peak resident memory so far."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------- data


def build_data(data_dir: str, name: str) -> None:
    """Builds `synthetic_shapes/<name>` (tfds, array_record) under `data_dir`: the registered
    `detection` config, or `smoke` (the same recipe, 8 training images)."""
    from visionr1_jax.data.builders import synthetic_shapes

    if name == SMOKE_SHAPES_CONFIG:
        config = synthetic_shapes.ShapesConfig(name=name, num_train=8, num_validation=1)
    else:
        config = name
    builder = synthetic_shapes.SyntheticShapes(config=config, data_dir=data_dir)
    builder.download_and_prepare()


def export_records(data_dir: str, name: str, count: int, path: str) -> None:
    """The first `count` training records in file order, as JSON lines for the TRL side
    (which must not import tfds / jax): PNG bytes (hex), prompt, boxes, labels, label map,
    image size and the model-input size of the smart resize (for the `qwen25_abs` frame)."""
    import tensorflow_datasets as tfds
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    import visionr1_jax.data.builders  # noqa: F401  (registers the builders)
    from visionr1_jax.data import records

    source = tfds.data_source(
        f"synthetic_shapes/{name}", split="train", data_dir=data_dir, download=False
    )
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            r = source[i]
            h, w = int(r["height"]), int(r["width"])
            h_in, w_in = smart_resize(h, w, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
            row = dict(
                image=bytes(r["image"]).hex(),
                prompt=records.as_text(r["prompt"]),
                boxes=np.asarray(r["boxes"], np.float32).reshape(-1, 4).tolist(),
                labels=records.text_list(r["labels"]),
                label_map=json.loads(records.as_text(r["label_map"])),
                image_size=[h, w],
                input_size=[h_in, w_in],
            )
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------- TRL side


def _trl_rewards():
    """The three reward functions of the released Vision-R1 TRL code (format, recall,
    precision), each over the batch, computing its term as `tests/reward_reference.py`
    does (each parses and, for recall and precision, matches on its own, as released)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import reward_reference as ref

    class Target:
        def __init__(self, boxes, labels, label_map, image_size, input_size):
            self.boxes, self.labels, self.label_to_id = boxes, labels, label_map
            self.image_size, self.input_size = tuple(image_size), tuple(input_size)

    def texts(completions):
        return [c[0]["content"] for c in completions]

    def targets(kw):
        keys = ("boxes", "labels", "label_map", "image_size", "input_size")
        return [Target(*v) for v in zip(*(kw[k] for k in keys), strict=True)]

    def dual_format_reward(completions, **kw):
        out = []
        for text, target in zip(texts(completions), targets(kw), strict=True):
            r = ref.dual_format(text)
            out.append(r if len(target.boxes) > 0 else 1.0 - r)
        return out

    def recall_reward(completions, **kw):
        return [
            ref.reward(t, g)["recall"] for t, g in zip(texts(completions), targets(kw), strict=True)
        ]

    def precision_reward(completions, **kw):
        return [
            ref.reward(t, g)["precision"]
            for t, g in zip(texts(completions), targets(kw), strict=True)
        ]

    return [dual_format_reward, recall_reward, precision_reward]


def run_trl(args) -> dict:
    """One TRL `GRPOTrainer` run of `args.steps` steps; returns per-step times and memory."""
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from visionr1_jax import processing

    torch.set_num_threads(2)
    processor = processing.load_processor(
        args.checkpoint, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    tok = processor.tokenizer
    vision_ids = [
        tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    ]
    vision_ids = sorted({i for i in vision_ids if i is not None and i != tok.unk_token_id})
    rows = [json.loads(line) for line in open(args.records, encoding="utf-8")]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
            "labels": datasets.Sequence(datasets.Value("string")),
            "label_map": datasets.Value("string"),
            "image_size": datasets.Sequence(datasets.Value("int32")),
            "input_size": datasets.Sequence(datasets.Value("int32")),
        }
    )
    table = datasets.Dataset.from_list(
        [
            dict(
                image={"bytes": bytes.fromhex(r["image"]), "path": None},
                prompt=[{"role": "user", "content": r["prompt"]}],
                boxes=r["boxes"],
                labels=r["labels"],
                label_map=json.dumps(r["label_map"]),
                image_size=r["image_size"],
                input_size=r["input_size"],
            )
            for r in rows
        ],
        features=features,
    )
    fmt, recall, precision = _trl_rewards()

    def with_map(fn):
        def wrapped(completions, label_map, **kw):
            return fn(completions, label_map=[json.loads(m) for m in label_map], **kw)

        wrapped.__name__ = fn.__name__
        return wrapped

    b, g, new = args.b, args.g, args.new
    config = GRPOConfig(
        output_dir=os.path.join(args.workdir, "trl"),
        per_device_train_batch_size=b * g,  # completions per step: B prompts x G
        num_generations=g,
        max_completion_length=new,
        generation_kwargs={"min_new_tokens": new, "suppress_tokens": vision_ids},
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        beta=0.04,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=1e-6,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        shuffle_dataset=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32},
    )
    ends: list[float] = []
    step_logs: list[dict] = []
    mem: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())  # the first step's start
            if args.warmup == 0:
                mem["warmup_peak_mb"] = peak_rss_mb()

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())
            if len(ends) - 1 == args.warmup:
                mem["warmup_peak_mb"] = peak_rss_mb()

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                step_logs.append(dict(logs))

    trainer = GRPOTrainer(
        model=args.checkpoint,
        reward_funcs=[with_map(fmt), with_map(recall), with_map(precision)],
        args=config,
        train_dataset=table,
        processing_class=processor,
        callbacks=[Clock()],
    )
    trainer.train()
    steps = np.diff(ends).tolist()
    lengths = [(x["completions/min_length"], x["completions/max_length"]) for x in step_logs]
    assert all(lo == hi == new for lo, hi in lengths), lengths
    return dict(
        step_s=steps,
        warmup_peak_mb=mem.get("warmup_peak_mb"),
        reward=[x.get("reward") for x in step_logs],
        lengths=lengths,
    )


# ------------------------------------------------------------------------------- our side


DEMO_GRPO_CONFIG = os.path.join(ROOT, "configs", "demo_cpu.py") + ":experiment=False"


def run_ours(args) -> dict:
    """One `train.run` of `args.steps` steps (the plain GRPO job of configs/demo_cpu.py, with
    the benchmark's settings); returns the per-step `time/step` and memory."""
    from visionr1_jax import config_lib, sampler, train

    config = config_lib.load_config(DEMO_GRPO_CONFIG)
    config.seed = 0
    config.total_steps = args.steps
    config.progress = False
    config.model.checkpoint = args.checkpoint
    config.data.data_dir = args.data_dir
    config.data.builder_config = args.shapes_config
    config.data.batch_size = args.b
    config.data.shuffle = False  # file order, as the TRL side reads the records
    config.data.min_pixels, config.data.max_pixels = MIN_PIXELS, MAX_PIXELS
    config.grpo.num_generations = args.g
    config.grpo.max_new_tokens = args.new
    config.grpo.temperature, config.grpo.top_k, config.grpo.top_p = 1.0, 50, 1.0
    config.grpo.beta = 0.04
    config.grpo.num_iterations = 1
    config.optim.learning_rate = 1e-6
    config.optim.weight_decay = 0.0
    config.optim.grad_clip = 1.0
    config.optim.warmup_steps = 0

    # Full-length completions, as TRL's min_new_tokens: no stop token, and the stop tokens are
    # masked out of the sampling distribution (with the vision tokens the loop masks anyway).
    # The same call records VmHWM when step warmup + 1 begins (the peak of the warm-up steps).
    generate = sampler.generate
    calls = []
    mem: dict[str, float] = {}

    def full_length_generate(model, batch, **kw):
        calls.append(None)
        if len(calls) == args.warmup + 1:
            mem["warmup_peak_mb"] = peak_rss_mb()
        eos, _ = sampler.default_token_ids(model)
        kw["eos_token_id"] = ()
        kw["suppress_token_ids"] = tuple(sampler.vision_token_ids(model)) + tuple(eos)
        return generate(model, batch, **kw)

    sampler.generate = full_length_generate
    rows = train.run(config, args.workdir)
    assert len(rows) == args.steps and len(calls) == args.steps, (len(rows), len(calls))
    lengths = [r["completion/length"] for r in rows]
    assert all(x == args.new for x in lengths), lengths
    return dict(
        step_s=[r["time/step"] for r in rows],
        phases={k: [r[k] for r in rows] for k in rows[0] if k.startswith("time/")},
        warmup_peak_mb=mem.get("warmup_peak_mb"),
        reward=[r.get("reward/total") for r in rows],
        lengths=lengths,
    )


# ------------------------------------------------------------------------------- harness


def child(args) -> None:
    if args.child == "ours":
        res = run_ours(args)
    else:
        res = run_trl(args)
    import resource

    res["total_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def spawn(side: str, args, checkpoint: str, workdir: str) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", side, "--checkpoint", checkpoint,
        "--workdir", workdir, "--records", args.records, "--data-dir", args.data_dir,
        "--b", str(args.b), "--g", str(args.g), "--new", str(args.new),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--shapes-config", args.shapes_config,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{side} child exited with {out.returncode}:\n{out.stderr[-5000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", default="small,qwen", help="tokenizers: small (346), qwen (151,936)")
    p.add_argument("--rounds", type=int, default=2, help="alternated runs per side")
    p.add_argument("--steps", type=int, default=0, help="steps per run (0: 12 small, 5 qwen)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps of each run")
    p.add_argument("--b", type=int, default=2, help="prompts per step")
    p.add_argument("--g", type=int, default=4, help="completions per prompt")
    p.add_argument("--new", type=int, default=32, help="tokens per completion")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="does it still run: 1 round of 1 step per side, small vocabulary, B x G = 1 x 2, "
        "4 tokens, 8 images (overrides the options above)",
    )
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--records", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--shapes-config", default=SHAPES_CONFIG, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.smoke:
        args.vocab, args.rounds, args.steps, args.warmup = "small", 1, 1, 0
        args.b, args.g, args.new = 1, 2, 4
        args.shapes_config = SMOKE_SHAPES_CONFIG

    from importlib.metadata import version  # the parent needs neither torch nor trl

    from visionr1_jax.models import tiny

    print(
        f"{cpu_model()}, {os.cpu_count()} cores, load average {load()}; "
        + ", ".join(f"{m} {version(m)}" for m in ("jax", "torch", "transformers", "trl")),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        args.data_dir = os.path.join(tmp, "tfds")
        build_data(args.data_dir, args.shapes_config)
        vocabs = args.vocab.split(",")
        max_steps = max(args.steps or (12 if v == "small" else 5) for v in vocabs)
        args.records = os.path.join(tmp, "records.jsonl")
        export_records(args.data_dir, args.shapes_config, max_steps * args.b, args.records)
        table = []
        for vocab in vocabs:
            steps = args.steps or (12 if vocab == "small" else 5)
            run_args = argparse.Namespace(**{**vars(args), "steps": steps})
            path = tiny.write_tiny_checkpoint(
                os.path.join(tmp, f"ckpt_{vocab}"), "qwen2_5_vl_tiny", tokenizer=vocab,
                min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
            )  # fmt: skip
            results = {"ours": [], "trl": []}
            for r in range(args.rounds):
                for side in ("ours", "trl"):
                    workdir = os.path.join(tmp, f"{vocab}_{side}_{r}")
                    res = spawn(side, run_args, path, workdir)
                    results[side].append(res)
                    timed = res["step_s"][args.warmup :]
                    print(
                        f"  {vocab} round {r} {side}: median {np.median(timed):.3f} s/step "
                        f"(steps {', '.join(f'{t:.3f}' for t in res['step_s'])}), "
                        f"peak RSS {res['total_peak_mb']:,.0f} MB "
                        f"({res['warmup_peak_mb']:,.0f} MB after the warm-up steps), "
                        f"load {load()}",
                        flush=True,
                    )
            table.append(summary_row(vocab, results, args, vocab_size_of(path)))
            print("  raw:", json.dumps(results), flush=True)
        print(
            f"\nqwen2_5_vl_tiny, B x G = {args.b} x {args.g} completions of {args.new} tokens, "
            f"{args.rounds} alternated runs per side, median step time of steps > {args.warmup}; "
            f"load average at the end {load()}"
        )
        print(
            "| vocab | steps/run | ours steps/s (s/step) | TRL steps/s (s/step) | "
            "ratio (best runs) | ratio (median round) | ours peak RSS | TRL peak RSS | "
            "ours rollout / reward / reference / update s |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for row in table:
            print(row, flush=True)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo)."""
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def load() -> str:
    """The 1-minute load average (other processes on a shared machine)."""
    return f"{os.getloadavg()[0]:.1f}"


def vocab_size_of(path: str) -> int:
    """The checkpoint's model vocabulary (`text_config.vocab_size` of config.json)."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    return int(hf.get("text_config", {}).get("vocab_size") or hf["vocab_size"])


def summary_row(vocab: str, results: dict, args, vocab_size: int) -> str:
    """One Markdown row: steps/s of each side's best run, the ratios, the memory peaks."""
    w = args.warmup
    med = {k: np.array([np.median(r["step_s"][w:]) for r in v]) for k, v in results.items()}
    best = {k: v.min() for k, v in med.items()}
    peak = {k: max(r["total_peak_mb"] for r in v) for k, v in results.items()}
    phases = [
        np.median([np.median(r["phases"][f"time/{p}"][w:]) for r in results["ours"]])
        for p in ("rollout", "reward", "reference", "update")
    ]
    steps = len(results["ours"][0]["step_s"])
    return (
        f"| {vocab} ({vocab_size:,}) | {steps} | {1 / best['ours']:.3g} ({best['ours']:.3g} s) | "
        f"{1 / best['trl']:.3g} ({best['trl']:.3g} s) | "
        f"{best['trl'] / best['ours']:.2f}x | {np.median(med['trl'] / med['ours']):.2f}x | "
        f"{peak['ours']:,.0f} MB | {peak['trl']:,.0f} MB | "
        f"{' / '.join(f'{x:.3f}' for x in phases)} |"
    )


if __name__ == "__main__":
    main()
