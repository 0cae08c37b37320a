"""Oracles for the telemetry the training loop logs (issue 11): the matched IoU / GIoU of the
reward's assignment (numpy overlaps of scipy's Hungarian pairs on the reference's box-prior
cost) and the sampler's per-token entropy (numpy, float64, written from transformers' top-k
semantics). The keys reaching metrics.jsonl and TensorBoard are tested by the loop test
(`test_train_loop.py::test_telemetry_in_metrics_jsonl_tensorboard_and_renderings`); the files
of a remote workdir by tests/test_metrics_remote.py, W&B by tests/test_wandb.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reward_reference as ref
from scipy.optimize import linear_sum_assignment

from visionr1_jax import metrics, rewards, sampler

U = 2.0**-24  # float32 unit roundoff
CATEGORIES = ["cat", "dog", "bird"]


def _case(rng, n_gt, n_pred):
    size = (320, 240)  # (width, height) of the original image; the model saw it unscaled
    xy = rng.integers(0, 200, (n_gt, 2))
    gt = np.concatenate([xy, xy + rng.integers(4, 100, (n_gt, 2))], 1).astype(np.float32)
    gt_labels = [CATEGORIES[i] for i in rng.integers(0, 3, n_gt)]
    xy = rng.integers(0, 200, (n_pred, 2))
    pred = np.concatenate([xy, xy + rng.integers(4, 100, (n_pred, 2))], 1).astype(np.float32)
    pred_labels = [CATEGORIES[i] for i in rng.integers(0, 3, n_pred)]
    answer = json.dumps([{"bbox_2d": b.astype(int).tolist(), "label": label}
                         for b, label in zip(pred, pred_labels, strict=True)])  # fmt: skip
    ids = {name: i + 1 for i, name in enumerate(CATEGORIES)}  # every label known
    target = rewards.Target(gt, gt_labels, size, size, label_to_id=ids)
    return f"```json\n{answer}\n```", target, pred, pred_labels, gt, gt_labels


@pytest.mark.parametrize("seed", range(4))
def test_matched_iou_and_giou_are_the_mean_overlap_of_the_hungarian_pairs(seed):
    rng = np.random.default_rng(seed)
    cases = [_case(rng, int(rng.integers(1, 9)), int(rng.integers(0, 12))) for _ in range(24)]
    config = rewards.default_config("official")
    config.matcher = "hungarian"
    got = rewards.score([c[0] for c in cases], [c[1] for c in cases], config=config)
    for k, (_, target, pred, pl, gt, gl) in enumerate(cases):
        if len(pred) == 0:
            assert got["matched_iou_mean"][k] == got["matched_giou_mean"][k] == 0.0
            continue
        ids = target.label_to_id
        cost = ref.box_prior_cost(pred, [ids[x] for x in pl], gt, [ids[x] for x in gl])
        rows, cols = linear_sum_assignment(cost)
        iou = ref.box_iou(pred.astype(np.float64), gt.astype(np.float64))[0][rows, cols]
        giou = ref.generalized_box_iou(pred.astype(np.float64), gt.astype(np.float64))[rows, cols]
        # float32 IoU/GIoU of integer boxes < 2^9: a few roundings each (≤ 8 U of values in
        # [-1, 1]), then a float32 mean of ≤ 8 of them (≤ 8 U more).
        atol = 16 * U
        assert abs(got["matched_iou_mean"][k] - iou.mean()) <= atol, k
        assert abs(got["matched_giou_mean"][k] - giou.mean()) <= atol, k
        assert got["num_matched"][k] == len(rows)


def _entropy_oracle(logits, temperature, top_k):
    """float64: logits / T, keep those >= the k-th largest (ties kept, as transformers'
    TopKLogitsWarper), softmax, −Σ p log p."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)


@pytest.mark.parametrize("top_k", [0, 1, 5])
def test_sampled_token_entropy_is_the_sampling_distributions(top_k):
    rng = np.random.default_rng(top_k)
    v = 64
    logits = rng.normal(0, 3, (6, v)).astype(np.float32)
    logits[0] = np.round(logits[0])  # integer logits: ties at the k-th value
    logits[1] = 0.0  # uniform: entropy log(k or V)
    keys = jax.random.split(jax.random.key(0), 6)
    _, _, ent = sampler.sample_tokens(
        jnp.asarray(logits), keys, greedy=False, temperature=jnp.float32(0.7), top_k=top_k,
        top_p=None,
    )  # fmt: skip
    want = _entropy_oracle(logits, 0.7, top_k)
    # float32 log-softmax over V entries and a sum of V terms p·log p (|log p| <= ~log V + 20):
    # ≤ (V + 8) U relative to the largest term's scale.
    atol = (v + 8) * U * (np.log(v) + 20)
    np.testing.assert_allclose(np.asarray(ent), want, atol=atol, rtol=0)
    assert abs(want[1] - np.log(v)) < 1e-12  # all tied at the k-th value: all kept
    _, _, greedy = sampler.sample_tokens(
        jnp.asarray(logits), keys, greedy=True, temperature=jnp.float32(1), top_k=0, top_p=None
    )
    assert (np.asarray(greedy) == 0).all()


def test_sum_over_processes_one_process_is_identity():
    counts = {"data/skipped_total": 3, "data/skipped/bad_size": 3}
    assert metrics.sum_over_processes(counts) == counts
