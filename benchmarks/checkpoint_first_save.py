"""The first checkpoint save of a data-parallel run: orbax's default jax.Array handler against
the one `checkpoint.Checkpointer` registers (`REPLICA_PARALLEL_MIN_BYTES`).

With replicas (a mesh whose data axis is > 1), orbax's default has each replica write a slice
of every array, cut on the device by a small program compiled per array shape and replica on
the first save. Ours writes an array whose per-replica slice is under 1 MiB whole from one
replica. Each variant saves the same tree in a fresh process: `--arrays` float32 arrays of
[16 + 2i, 32] (the tiny model's sizes), FSDP-sharded on a (2, 2, 2) mesh of 8 CPU devices,
replicated over `data`; CPU seconds and wall seconds of the blocking part of the save, and
the write to completion.

`--smoke` (the test suite runs it: tests/test_bench_checkpoint.py) saves 2 arrays per handler: it
only checks that both still save and the table still prints.

    .venv/bin/python benchmarks/checkpoint_first_save.py               # 100 arrays
    .venv/bin/python benchmarks/checkpoint_first_save.py --arrays 200
    .venv/bin/python benchmarks/checkpoint_first_save.py --smoke       # does it still run?
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import json, sys, time
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from visionr1_jax import checkpoint

variant, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
tree = {f"w{i}": jax.device_put(jnp.ones((16 + 2 * i, 32)), NamedSharding(mesh, P("fsdp")))
        for i in range(n)}
jax.block_until_ready(tree)
if variant == "ours":
    checkpoint._register_array_handler()
ckpt = ocp.StandardCheckpointer()
cpu, wall = time.process_time(), time.perf_counter()
ckpt.save(path, tree)
blocked = time.perf_counter() - wall
ckpt.wait_until_finished()
print(json.dumps({"blocked_s": blocked, "total_s": time.perf_counter() - wall,
                  "cpu_s": time.process_time() - cpu}))
"""


def measure(variant: str, arrays: int, directory: str) -> dict[str, float]:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    path = os.path.join(directory, variant)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, variant, str(arrays), path],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="does it still run: 2 arrays")
    args = parser.parse_args()
    if args.smoke:
        args.arrays = 2
    with tempfile.TemporaryDirectory() as d:
        got = {v: measure(v, args.arrays, d) for v in ("orbax_default", "ours")}
    print(f"first save of {args.arrays} float32 arrays, (2, 2, 2) CPU mesh, replicated over data")
    print(f"{'handler':<14} {'blocked s':>10} {'to disk s':>10} {'CPU s':>8}")
    for name, r in got.items():
        print(f"{name:<14} {r['blocked_s']:>10.2f} {r['total_s']:>10.2f} {r['cpu_s']:>8.2f}")
    a, b = got["orbax_default"], got["ours"]
    print(f"orbax default / ours: blocked x{a['blocked_s'] / b['blocked_s']:.1f}, "
          f"CPU x{a['cpu_s'] / b['cpu_s']:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
