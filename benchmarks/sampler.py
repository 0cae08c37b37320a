"""Rollout throughput: our jitted sampler vs transformers `generate` (PyTorch), CPU.

Both sides sample B * G completions of `--new` tokens (temperature 1, no top-k / top-p, no
early stop) for the same B prompts (one image each, six sizes, left padding) of the same tiny
checkpoint, with 2 threads each. transformers gets the prompts once and
`num_return_sequences=G` (it expands prompts and images per completion, as the Vision-R1 / TRL
reference does); ours encodes and prefills each prompt once and shares its KV cache across the
G completions. Each side runs in its own process so that its peak resident memory
(`ru_maxrss`) is its own.

    .venv/bin/python benchmarks/sampler.py                       # B*G = 32 and 128, 128 tokens
    .venv/bin/python benchmarks/sampler.py --shapes 8x4 --new 64 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

SIZES = [(100, 150), (224, 168), (60, 60), (300, 120), (140, 140), (112, 224)]


def make_batch(path: str, b: int, seed: int = 0) -> dict[str, np.ndarray]:
    """B prompts of varied length, one image each (six sizes), left padded."""
    from visionr1_jax import processing
    from visionr1_jax.models.testing import random_images

    proc = processing.load_processor(path)
    rng = np.random.default_rng(seed)
    texts, images = [], []
    for i in range(b):
        q = "Locate every cat in the image and output the coordinates in JSON format. " * (
            1 + i % 3
        )
        texts.append(processing.render_prompt(proc, q, num_images=1))
        images.append(random_images(rng, [SIZES[i % len(SIZES)]]))
    return processing.encode_batch(proc, texts, images)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(path: str, b: int, g: int, new: int, repeats: int, cache_dtype: str) -> dict:
    import jax

    from visionr1_jax import sampler
    from visionr1_jax.models import from_pretrained

    batch = make_batch(path, b)
    model = from_pretrained(path)
    kw = dict(
        num_generations=g, max_new_tokens=new, temperature=1.0, eos_token_id=(),
        cache_dtype=cache_dtype,
    )  # fmt: skip
    t0 = time.perf_counter()
    out = sampler.generate(model, batch, rng=jax.random.key(0), **kw)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = sampler.generate(model, batch, rng=jax.random.key(i + 1), **kw)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    n_tok = int(np.asarray(out.num_tokens).sum())
    assert n_tok == b * g * new, n_tok
    return dict(
        seconds=min(times),
        tokens=n_tok,
        first_call_s=first,
        compiled=sampler.compile_count(),
        peak_rss_mb=peak_rss_mb(),
    )


def run_hf(path: str, b: int, g: int, new: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(2)
    batch = make_batch(path, b)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(batch["input_ids"]).long()
    kw = dict(
        input_ids=ids,
        attention_mask=torch.tensor(batch["attention_mask"]).long(),
        pixel_values=torch.tensor(batch["pixel_values"]),
        image_grid_thw=torch.tensor(batch["image_grid_thw"]).long(),
        mm_token_type_ids=(ids == hf.config.image_token_id).long(),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_return_sequences=g,
        max_new_tokens=new,
        min_new_tokens=new,
    )

    def once():
        with torch.no_grad():
            return hf.generate(**kw)

    once()  # warm-up
    times = []
    for i in range(repeats):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        out = once()
        times.append(time.perf_counter() - t0)
    n_tok = int(out[:, ids.shape[1] :].numel())
    assert n_tok == b * g * new, n_tok
    return dict(seconds=min(times), tokens=n_tok, peak_rss_mb=peak_rss_mb())


def child(args) -> None:
    if args.side == "ours":
        res = run_ours(args.path, args.b, args.g, args.new, args.repeats, args.cache_dtype)
    else:
        res = run_hf(args.path, args.b, args.g, args.new, args.repeats)
    print("RESULT " + json.dumps(res), flush=True)


def spawn(side: str, path: str, b: int, g: int, args) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", side, "--path", path,
        "--b", str(b), "--g", str(g), "--new", str(args.new), "--repeats", str(args.repeats),
        "--cache-dtype", args.cache_dtype,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{side} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="qwen2_5_vl_tiny")
    p.add_argument("--tokenizer", default="small")
    p.add_argument("--shapes", default="8x4,32x4", help="comma-separated BxG")
    p.add_argument("--new", type=int, default=128, help="tokens per completion")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dtype", default="float32")
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--b", type=int, help=argparse.SUPPRESS)
    p.add_argument("--g", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.side = args.child
        child(args)
        return

    from visionr1_jax.models import tiny

    with tempfile.TemporaryDirectory() as tmp:
        path = tiny.write_tiny_checkpoint(
            os.path.join(tmp, args.config), args.config, tokenizer=args.tokenizer
        )
        print(
            f"config {args.config} ({args.tokenizer} tokenizer), {args.new} new tokens, "
            f"temperature 1, best of {args.repeats}, 2 threads each, cache {args.cache_dtype}"
        )
        print(
            "| B x G | ours tok/s | transformers tok/s | ratio | ours peak RSS | "
            "transformers peak RSS | ours first call (compile) |"
        )
        print("|---|---|---|---|---|---|---|")
        for shape in args.shapes.split(","):
            b, g = (int(x) for x in shape.split("x"))
            ours = spawn("ours", path, b, g, args)
            hf = spawn("hf", path, b, g, args)
            r_ours = ours["tokens"] / ours["seconds"]
            r_hf = hf["tokens"] / hf["seconds"]
            print(
                f"| {b} x {g} = {b * g} | {r_ours:,.0f} | {r_hf:,.0f} | {r_ours / r_hf:.2f}x | "
                f"{ours['peak_rss_mb']:,.0f} MB | {hf['peak_rss_mb']:,.0f} MB | "
                f"{ours['first_call_s']:.1f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
