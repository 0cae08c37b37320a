"""Rollout throughput: our jitted sampler vs transformers `generate` (PyTorch), CPU.

Both sides sample B * G completions of `--new` tokens (temperature 1, no top-k / top-p, no
early stop) for the same B prompts (one image each, six sizes, left padding) of the same tiny
checkpoint, with 2 threads each. transformers gets the prompts once and
`num_return_sequences=G` (it expands prompts and images per completion, as the Vision-R1 / TRL
reference does); ours encodes and prefills each prompt once and shares its KV cache across the
G completions. Each side runs in its own process (so that its peak resident memory, VmHWM
after the warm-up call, is its own); the parent alternates calls between the two processes
(A B A B ...) so that load from other processes on a shared machine hits both alike, and reports
best-of-rounds and median-of-rounds ratios plus the ratio of process CPU time.

`--smoke` (the test suite runs it: tests/test_bench_model.py) only checks that both sides still
run and the table still prints: B x G = 1 x 2, 4 tokens, one timed call per side.

    .venv/bin/python benchmarks/sampler.py                       # B*G = 32 and 128, 128 tokens
    .venv/bin/python benchmarks/sampler.py --shapes 8x4 --new 64 --repeats 2
    .venv/bin/python benchmarks/sampler.py --smoke               # does it still run?
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
# torch's OpenMP threads otherwise spin at barriers; on a shared 2-core machine a descheduled
# thread then costs the other one its whole time slice (observed: the same generate call taking
# 0.4 s or 32 s). Passive waiting only helps the baseline; XLA does not use OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
    """Peak resident memory of this process (MB), since start or the last `reset_peak_rss`."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux `clear_refs` 5), so that the peak measured next
    is the steady-state generation's, not the imports' or the compiler's."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def setup_ours(path: str, b: int, g: int, new: int, cache_dtype: str):
    """(run(i) -> completion tokens, info() -> dict) for our sampler; compiles on setup."""
    import jax

    from visionr1_jax import sampler
    from visionr1_jax.models import from_pretrained

    batch = make_batch(path, b)
    model = from_pretrained(path)
    kw = dict(
        num_generations=g, max_new_tokens=new, temperature=1.0, eos_token_id=(),
        cache_dtype=cache_dtype,
    )  # fmt: skip

    def run(i: int) -> int:
        out = sampler.generate(model, batch, rng=jax.random.key(i), **kw)
        return int(np.asarray(out.num_tokens).sum())  # waits for the result

    t0 = time.perf_counter()
    run(0)
    first = time.perf_counter() - t0

    def info() -> dict:
        mem = next(iter(sampler._PROGRAMS.values())).memory_analysis()
        xla = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
        return dict(first_call_s=first, compiled=sampler.compile_count(), xla_mb=xla / 2**20)

    return run, info


def setup_hf(path: str, b: int, g: int, new: int):
    """(run(i) -> completion tokens, info) for transformers `generate`."""
    import torch
    from transformers import AutoModelForImageTextToText

    from visionr1_jax.models import testing

    torch.set_num_threads(2)
    batch = make_batch(path, b)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    kw = dict(
        **testing.hf_inputs(batch, hf),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        num_return_sequences=g,
        max_new_tokens=new,
        min_new_tokens=new,
    )

    def run(i: int) -> int:
        torch.manual_seed(i)
        with torch.no_grad():
            out = hf.generate(**kw)
        return int(out[:, kw["input_ids"].shape[1] :].numel())

    run(0)
    return run, dict


def child(args) -> None:
    """One side in its own process, driven over stdin by the parent: `run I` times one call
    (prints `TIME wall cpu`), `quit` prints memory figures and exits."""
    if args.side == "ours":
        run, info = setup_ours(args.path, args.b, args.g, args.new, args.cache_dtype)
    else:
        run, info = setup_hf(args.path, args.b, args.g, args.new)
    base = rss_mb()
    reset_peak_rss()  # the peak below is steady-state generation, not imports or compilation
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            t0, c0 = time.perf_counter(), time.process_time()
            n = run(int(cmd[1]))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert n == args.b * args.g * args.new, n
            print(f"TIME {wall} {cpu}", flush=True)
        else:
            peak = peak_rss_mb()
            total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            res = dict(peak_rss_mb=peak, gen_rss_mb=peak - base, total_peak_rss_mb=total, **info())
            print("RESULT " + json.dumps(res), flush=True)
            return


class Side:
    """A child process serving one side."""

    def __init__(self, side: str, path: str, b: int, g: int, args):
        cmd = [
            sys.executable, os.path.abspath(__file__), "--child", side, "--path", path,
            "--b", str(b), "--g", str(g), "--new", str(args.new),
            "--cache-dtype", args.cache_dtype,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"child exited with {self.proc.wait()}")

    def run(self, i: int) -> tuple[float, float]:
        self.proc.stdin.write(f"run {i}\n")
        wall, cpu = self._expect("TIME").split()
        return float(wall), float(cpu)

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        res = json.loads(self._expect("RESULT"))
        self.proc.wait()
        return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="qwen2_5_vl_tiny")
    p.add_argument("--tokenizer", default="small")
    p.add_argument("--shapes", default="8x4,32x4", help="comma-separated BxG")
    p.add_argument("--new", type=int, default=128, help="tokens per completion")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache-dtype", default="float32")
    p.add_argument(
        "--smoke", action="store_true", help="does it still run: 1x2, 4 tokens, 1 call per side"
    )
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--b", type=int, help=argparse.SUPPRESS)
    p.add_argument("--g", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.side = args.child
        child(args)
        return
    if args.smoke:
        args.shapes, args.new, args.repeats = "1x2", 4, 1

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
            "| B x G | ours tok/s | transformers tok/s | ratio (best of rounds) | "
            "ratio (median round) | ratio (CPU time) | ours peak RSS | transformers peak RSS | "
            "ours XLA buffers | ours first call (compile) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for shape in args.shapes.split(","):
            b, g = (int(x) for x in shape.split("x"))
            sides = {"ours": Side("ours", path, b, g, args), "hf": Side("hf", path, b, g, args)}
            wall = {k: [] for k in sides}
            cpu = {k: [] for k in sides}
            for i in range(args.repeats):  # A B A B ...: load from other processes hits both
                for k, side in sides.items():
                    w, c = side.run(i + 1)
                    wall[k].append(w)
                    cpu[k].append(c)
            ours, hf = sides["ours"].close(), sides["hf"].close()
            n = b * g * args.new
            w_ours, w_hf = np.asarray(wall["ours"]), np.asarray(wall["hf"])
            c_ours, c_hf = np.median(cpu["ours"]), np.median(cpu["hf"])
            print(
                f"| {b} x {g} = {b * g} | {n / w_ours.min():,.0f} | {n / w_hf.min():,.0f} | "
                f"{w_hf.min() / w_ours.min():.2f}x | {np.median(w_hf / w_ours):.2f}x | "
                f"{c_hf / c_ours:.2f}x | {ours['peak_rss_mb']:,.0f} MB | "
                f"{hf['peak_rss_mb']:,.0f} MB | {ours['xla_mb']:,.1f} MB | "
                f"{ours['first_call_s']:.1f} s |",
                flush=True,
            )
            raw = {"wall": wall, "cpu": cpu, "ours": ours, "transformers": hf}
            print("  raw:", json.dumps(raw), flush=True)


if __name__ == "__main__":
    main()
