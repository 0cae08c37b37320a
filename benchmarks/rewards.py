"""Reward throughput: our path vs a per-sample host path that works like the reference code.

    python benchmarks/rewards.py                 # 512 and 4,096 completions
    python benchmarks/rewards.py --sizes 4096 --repeats 5
    python benchmarks/rewards.py --smoke         # does it still run? (16 completions, once)

Both sides score the same synthetic completions (1–30 predicted boxes each, 1–30 ground-truth
boxes, jittered, duplicated, missed and spurious boxes, some unknown labels):

* ours: host parse (``parse.parse_batch``) + the jitted batched reward (``make_reward_fn``);
* reference-style: what Vision-R1's TRL reward functions do per completion — three separate
  reward functions (dual format, recall, precision); recall and precision each re-parse the
  answer, build torch tensors, compute ``cdist`` + GIoU in torch and run
  ``scipy.optimize.linear_sum_assignment`` (written here, not copied).

It also times the matching alone: our jitted ``matching.hungarian`` on the padded batch of
the same 4,096 box-prior cost matrices vs a loop of ``linear_sum_assignment`` over them, on
one device and with the batch split over the host's CPU devices (one per core; the reward is
per completion, so it shards like the rest of the batch). Each ratio is printed.

``--smoke`` (the test suite runs it: tests/test_bench_grpo_step.py) only checks that every side
still runs and every line still prints: 16 completions, each side timed once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# Two CPU devices (one per core) unless XLA_FLAGS already sets a count; other flags are kept.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import PartitionSpec
from scipy.optimize import linear_sum_assignment

from visionr1_jax import host, rewards
from visionr1_jax.rewards import matching

CATS = ["person", "car", "dog", "cat", "traffic light", "bottle"]


def synthetic(count: int, seed: int = 0):
    """``count`` (completion, Target) pairs with 1–30 boxes on each side."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(300, 800, 2))
        h_in, w_in = (max(28, round(v / 28) * 28) for v in (h, w))
        n = int(rng.integers(1, 31))
        xy = rng.uniform(0, [w * 0.8, h * 0.8], (n, 2))
        gt = np.concatenate([xy, np.minimum(xy + rng.uniform(8, 200, (n, 2)), [w, h])], 1)
        labels = [str(rng.choice(CATS)) for _ in range(n)]
        m = int(rng.integers(1, 31))
        items = []
        for _ in range(m):
            if rng.random() < 0.8:
                k = int(rng.integers(n))
                box = gt[k] * np.array([w_in / w, h_in / h] * 2) + rng.normal(0, 6, 4)
                label = labels[k] if rng.random() < 0.9 else "unicorn"
            else:
                x, y = rng.uniform(0, [w_in * 0.8, h_in * 0.8])
                box = [x, y, x + rng.uniform(8, 150), y + rng.uniform(8, 150)]
                label = str(rng.choice(CATS))
            items.append({"bbox_2d": [int(v) for v in box], "label": label})
        text = "```json\n" + json.dumps(items) + "\n```"
        target = rewards.Target(
            gt, labels, (h, w), (h_in, w_in), {c: k + 1 for k, c in enumerate(CATS)}
        )
        out.append((text, target))
    return out


# ----------------------------------------------------------------------------------------
# Reference-style per-sample path (torch tensors per sample + scipy Hungarian).


def _ref_parse_json(text):
    try:
        lines = text.strip().splitlines()
        if lines[0].startswith("```json"):
            text = "\n".join(lines[1:])
        if "```" in text:
            text = text.split("```")[0]
        return json.loads(text)
    except Exception:
        return None


_REF_RE = re.compile(
    r'\{"bbox_2d": \[(\d{1,3}|1000), (\d{1,3}|1000), (\d{1,3}|1000), (\d{1,3}|1000)\], '
    r'"label": "([^"]+)"\}'
)


def _ref_extract(text):
    out = []
    data = _ref_parse_json(text)
    if isinstance(data, list):
        for item in data:
            try:
                box = item.get("bbox_2d")
                if isinstance(box, list) and len(box) == 4:
                    box = [int(c) for c in box]
                    if box[0] < box[2] and box[1] < box[3]:
                        out.append((box, item.get("label")))
            except Exception:
                continue
    if not out:
        for g in _REF_RE.findall(text):
            box = [int(v) for v in g[:4]]
            if box[0] < box[2] and box[1] < box[3]:
                out.append((box, g[4]))
    return out


def _torch_giou(a, b):
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / union
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull


def _ref_match(text, target):
    """Per-sample matching as the reference's BoxPriorMatcher: returns matched GIoUs."""
    dt = _ref_extract(text.strip())
    if not dt:
        return None
    h, w = target.image_size
    h_in, w_in = target.input_size
    ids, boxes = [], []
    for box, label in dt:
        try:
            ids.append(target.label_to_id[label.strip().lower()])
        except Exception:
            ids.append(0)
        b = torch.tensor(box, dtype=torch.float32).view(-1, 4)
        b[:, ::2] = b[:, ::2] / w_in * w
        b[:, 1::2] = b[:, 1::2] / h_in * h
        boxes.append(b)
    boxes = torch.cat(boxes)
    probs = torch.zeros(len(ids), max(target.label_to_id.values()) + 1)
    probs[torch.arange(len(ids)), ids] = 1.0
    gt = torch.tensor(target.boxes, dtype=torch.float32)
    gt_ids = torch.tensor(target.label_ids, dtype=torch.long)
    giou = _torch_giou(boxes, gt)
    cost = torch.cdist(boxes, gt, p=1) - probs[:, gt_ids] - giou
    rows, cols = linear_sum_assignment(cost.numpy())
    return giou[rows, cols]


def _ref_format(text):
    text = re.sub(r"```json\n|\n```", "", text).strip()
    try:
        data = json.loads(text)
        if isinstance(data, list):
            for item in data:
                if isinstance(item, dict) and "bbox_2d" in item and "label" in item:
                    box = item["bbox_2d"]
                    if not (isinstance(box, list) and len(box) == 4):
                        return 0.0
    except json.JSONDecodeError:
        return 0.0
    return 1.0


def reference_scores(samples):
    """Three reward functions, each looping over the samples like the TRL reward functions."""
    fmt = [_ref_format(t) for t, _ in samples]
    recall = []
    for text, target in samples:
        q = _ref_match(text, target)
        recall.append(0.0 if q is None else float((q > 0.5).float().sum()) / len(target.boxes))
    precision = []
    for text, target in samples:
        q = _ref_match(text, target)
        precision.append(0.0 if q is None else float(q.clamp(min=0).mean()))
    return np.array(fmt) + np.array(recall) + np.array(precision)


# ----------------------------------------------------------------------------------------


def _best(fn, repeats):
    """(min wall seconds, min process CPU seconds, all threads) over ``repeats`` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    return min(walls), min(cpus)


def end_to_end(size: int, repeats: int) -> None:
    samples = synthetic(size, seed=size)
    texts, targets = [t for t, _ in samples], [g for _, g in samples]
    config = rewards.default_config("official")
    fn = rewards.make_reward_fn(config)

    def ours():
        pred, gt, _ = rewards.prepare(texts, targets, config)
        total, _ = fn(pred, gt, jnp.int32(0))
        return np.asarray(total)

    got = ours()  # compile
    want = reference_scores(samples)
    agree = float(np.mean(np.abs(got - want) < 1e-4))
    t_ours, c_ours, t_ref, c_ref = np.inf, np.inf, np.inf, np.inf
    for _ in range(max(1, repeats // 2)):  # alternate so machine noise hits both sides
        wall, cpu = _best(ours, 2)
        t_ours, c_ours = min(t_ours, wall), min(c_ours, cpu)
        wall, cpu = _best(lambda: reference_scores(samples), 1)
        t_ref, c_ref = min(t_ref, wall), min(c_ref, cpu)
    print(
        f"end-to-end  C={size:5d}  ours {size / t_ours:8.0f} compl/s  "
        f"reference-style {size / t_ref:6.0f} compl/s  wall ratio {t_ref / t_ours:5.1f}x  "
        f"CPU-time ratio {c_ref / c_ours:5.1f}x  (agreement {agree:.4f})"
    )


def matching_alone(size: int, repeats: int) -> None:
    """Our jitted Hungarian (one device, all devices) vs a scipy loop, `repeats` rounds."""
    samples = synthetic(size, seed=size)
    config = rewards.default_config("official")
    pred, gt, _ = rewards.prepare([t for t, _ in samples], [g for _, g in samples], config)
    cost, _ = jax.jit(jax.vmap(matching.box_prior_cost))(
        pred.boxes, pred.labels, gt.boxes, gt.labels
    )
    cost = np.asarray(cost)
    mats = [cost[b][pred.valid[b]][:, gt.valid[b]].astype(np.float64) for b in range(size)]
    args = [jnp.asarray(x) for x in (cost, pred.valid, gt.valid)]

    def scipy_loop():
        for c in mats:
            linear_sum_assignment(c)

    single = jax.jit(matching.hungarian)
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = PartitionSpec("batch")
    sharded = jax.jit(
        jax.shard_map(
            matching.hungarian,
            mesh=mesh,
            in_specs=(spec, spec, spec),
            out_specs=(spec, spec),
            check_vma=False,
        )
    )
    sharded_args = [jax.device_put(x, jax.NamedSharding(mesh, spec)) for x in args]
    jax.block_until_ready(single(*args))
    jax.block_until_ready(sharded(*sharded_args))
    rows = {"scipy loop": [], "ours, 1 device": [], f"ours, {len(devices)} devices": []}
    for _ in range(repeats):  # interleaved so that machine noise hits every side alike
        rows["scipy loop"].append(_best(scipy_loop, 1)[0])  # wall seconds
        rows["ours, 1 device"].append(_best(lambda: jax.block_until_ready(single(*args)), 1)[0])
        rows[f"ours, {len(devices)} devices"].append(
            _best(lambda: jax.block_until_ready(sharded(*sharded_args)), 1)[0]
        )
    base = np.median(rows["scipy loop"])
    for name, values in rows.items():
        med = float(np.median(values))
        print(
            f"matching    C={size:5d}  {name:<18} median {med * 1e3:7.2f} ms  "
            f"min {min(values) * 1e3:7.2f} ms  speed vs scipy loop {base / med:5.2f}x"
        )


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--default-malloc", action="store_true", help="skip host.keep_freed_memory()"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="does it still run: 16 completions, each side once"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats = [16], 1
    torch.set_num_threads(2)
    kept = False if args.default_malloc else host.keep_freed_memory()
    print(
        f"jax {jax.__version__} devices {jax.devices()} | torch {torch.__version__} threads 2"
        f" | host.keep_freed_memory (all sides): {kept}"
    )
    for size in args.sizes:
        end_to_end(size, args.repeats)
    matching_alone(max(args.sizes), args.repeats if args.smoke else max(args.repeats, 7))


if __name__ == "__main__":
    main(sys.argv[1:])
