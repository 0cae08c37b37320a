"""The one greedy evaluator (SPEC §7): answers on the evaluation split, parsed and scored as
the reward parses and scores them, the protocol's metrics, the results on disk, and
`python -m visionr1_jax.evaluate`.

1. **Decoding.** Greedy decoding with our sampler (``sampler.py``, temperature 0,
   ``eval.max_new_tokens``), one prompt per query, sharded over the run's mesh; each process
   decodes its rows (`predict`).
2. **Parsing.** The reward's parser (``rewards.parse.parse_answer``, the same rules for reward
   and evaluation, SPEC §2) turns each answer into boxes in the model's frame, mapped to xyxy
   original-image pixels (`answer_of`), in the order the model wrote them.
3. **Metrics** (`compute_metrics`): the protocol's (``eval_metrics``: COCO box metrics,
   ODINW's per-set average, REC Acc@0.5) and the reward's view of the same answers through
   the one scoring path (``scoring.score``): parse and format rates, matched IoU.

The training loop evaluates with it every ``eval.every`` steps (GRPO and SFT alike), the
experiment evaluates each stage with it, and the command line evaluates a run's checkpoint::

    python -m visionr1_jax.evaluate --config=configs/eval_coco.py --workdir=WORKDIR \\
        [--checkpoint=STEP|base|HF_DIR]
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from visionr1_jax import checkpoint as checkpoint_lib
from visionr1_jax import (
    cli,
    config_lib,
    fs,
    host,
    loading,
    preflight,
    processing,
    sampler,
    scoring,
    state,
)
from visionr1_jax import metrics as metrics_lib
from visionr1_jax.data import config as data_config_lib
from visionr1_jax.data import pipeline
from visionr1_jax.eval_metrics import (
    PAPER_SCORE,
    detection_metrics,
    odinw_average,
    rec_accuracy,
)
from visionr1_jax.rewards import Target, parse
from visionr1_jax.sections.run import eval_config, protocol_of

__all__ = [
    "Answer",
    "answer_of",
    "box_scores",
    "compute_metrics",
    "detection_metrics",
    "evaluate",
    "format_table",
    "load_for_eval",
    "predict",
    "run",
    "write_results",
]


@dataclasses.dataclass
class Answer:
    """One evaluated query: the greedy answer and what it predicts, in original pixels.

    Attributes:
      record_id: the dataset record (ODINW: `<set>/<split>/<image_id>/<category_id>`).
      completion: the decoded answer (special tokens skipped).
      target: the record's ground truth (`rewards.Target`).
      boxes: f32[M, 4] xyxy original-image pixels, in the answer's order.
      labels: the M predicted labels as written (non-string labels become "").
      scores: f32[M] (`eval.score`).
      truncated: the answer hit `max_new_tokens` without a stop token.
    """

    record_id: str
    completion: str
    target: Target
    boxes: np.ndarray
    labels: list[str]
    scores: np.ndarray
    truncated: bool

    def to_json(self) -> dict:
        t = self.target
        return {
            "record_id": self.record_id,
            "completion": self.completion,
            "boxes": np.asarray(self.boxes, np.float64).round(3).tolist(),
            "labels": list(self.labels),
            "scores": np.asarray(self.scores, np.float64).tolist(),
            "truncated": bool(self.truncated),
            "target": {
                "boxes": np.asarray(t.boxes, np.float64).tolist(),
                "labels": list(t.labels),
                "image_size": list(t.image_size),
                "input_size": list(t.input_size),
                "label_to_id": dict(t.label_to_id or {}),
            },
        }

    @classmethod
    def from_json(cls, d: Mapping) -> Answer:
        t = d["target"]
        target = Target(
            np.asarray(t["boxes"], np.float32).reshape(-1, 4),
            list(t["labels"]),
            tuple(t["image_size"]),
            tuple(t["input_size"]),
            label_to_id=dict(t["label_to_id"]),
        )
        return cls(
            d["record_id"],
            d["completion"],
            target,
            np.asarray(d["boxes"], np.float32).reshape(-1, 4),
            list(d["labels"]),
            np.asarray(d["scores"], np.float32),
            bool(d["truncated"]),
        )


_BBOX_RE = re.compile(rb'"bbox_2d"\s*:\s*\[([^\]]*)\]')  # an item's box list, in bytes


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the printable character that stands for each
    byte (printable Latin-1 bytes stand for themselves; the other 68 get 256, 257, ...)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """The UTF-8 bytes each token contributes to `decode(ids, skip_special_tokens=True)`:
    byte-level BPE tokens map back through the GPT-2 byte alphabet; special tokens give b""."""
    inverse = _byte_alphabet()
    special = set(tokenizer.all_special_ids)
    out = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True):
        if i in special or piece is None:
            out.append(b"")
        elif all(ch in inverse for ch in piece):
            out.append(bytes(inverse[ch] for ch in piece))
        else:  # not byte-level: the piece's own text
            out.append(tokenizer.decode([i], skip_special_tokens=True).encode())
    return out


def box_scores(
    tokenizer, ids: Sequence[int], logprobs: np.ndarray, model_boxes: Sequence[Sequence[float]]
) -> np.ndarray:
    """Each parsed box's score from the model's own token probabilities: exp of the mean
    log-prob of the tokens that wrote its coordinates (the `[x1, y1, x2, y2]` of its
    `"bbox_2d"` item), a geometric-mean probability in (0, 1].

    The answer's `"bbox_2d"` lists are found in the decoded bytes in order; parsed box k takes
    the first unused list whose four numbers equal its coordinates (in the model's frame), so a
    list the parser dropped is skipped. A box without such a list (a regex-fallback parse with
    other spacing) gets the mean over all the answer's tokens.

    Args:
      tokenizer: the checkpoint's tokenizer; ids: the answer's generated token ids (masked
        tail removed); logprobs: f32[len(ids)] their log-probs under the model (greedy);
      model_boxes: the parsed boxes [M][4] in the model's frame, answer order.
    Returns:
      f32[M] scores.
    """

    pieces = _token_bytes(tokenizer, ids)
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - np.asarray([len(p) for p in pieces])
    text = b"".join(pieces)
    lp = np.asarray(logprobs, np.float64)[: len(ids)]
    fallback = float(np.exp(lp.mean())) if len(lp) else 0.0
    spans = []
    for m in _BBOX_RE.finditer(text):
        numbers = re.findall(rb"-?\d+(?:\.\d+)?", m.group(1))
        try:
            values = [float(v) for v in numbers]
        except ValueError:
            values = []
        spans.append((m.start(1), m.end(1), values))
    used = [False] * len(spans)
    out = []
    for box in model_boxes:
        score = fallback
        for k, (a, b, values) in enumerate(spans):
            if used[k] or len(values) != 4:
                continue
            if all(abs(float(v) - float(c)) < 1e-6 for v, c in zip(values, box, strict=True)):
                used[k] = True
                inside = (starts < b) & (ends > a)
                if inside.any():
                    score = float(np.exp(lp[inside].mean()))
                break
        out.append(score)
    return np.asarray(out, np.float32)


def answer_of(tokenizer, record_id, ids, logps, target, truncated, rc, score) -> Answer:
    """One greedy answer (token ids, their log-probs) decoded, parsed as the reward parses it
    (`rewards.parse.parse_answer` with the reward config `rc`; labels kept as written), its
    boxes mapped from the model's frame (the resized input, `target.input_size`) to the
    original image's pixels (`target.image_size`), and scored (`score`: constant or
    `box_scores`)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    parsed = parse.parse_answer(
        text,
        frame=rc.frame,
        input_size=tuple(target.input_size),
        max_boxes=int(rc.max_boxes),
        max_coord=float(rc.max_coord),
    )
    model_boxes = np.asarray(parsed.boxes, np.float64).reshape(-1, 4)
    boxes = parse.to_original_pixels(model_boxes, rc.frame, target.image_size, target.input_size)
    labels = [x if isinstance(x, str) else "" for x in parsed.labels]
    if score == "logprob":
        scores = box_scores(tokenizer, ids, logps, model_boxes)
    else:
        scores = np.full(len(labels), PAPER_SCORE, np.float32)
    return Answer(record_id, text, target, boxes.reshape(-1, 4), labels, scores, bool(truncated))


def predict(
    model: object, processor: object, batches: Iterable, config: ml_collections.ConfigDict, *,
    max_new_tokens: int, score: str,
) -> list[Answer]:  # fmt: skip
    """Greedy answers to the prompts of `batches`, this process's rows, in pipeline order.

    Args:
      model: the policy (`QwenVL`), possibly sharded; call under `jax.set_mesh(mesh)`.
      processor: the checkpoint's processor (its tokenizer decodes).
      batches: `pipeline.DeviceBatch`es of the evaluation pipeline (global arrays sharded over
        the mesh's batch axes; padding rows are dropped).
      config: the run config (the `reward` section's parser settings and frame; without one,
        the `official` reward in the data's frame: `scoring.reward_config`).
      max_new_tokens: greedy budget; score: `constant` or `logprob`.
    """
    rc = scoring.reward_config(config)
    tokenizer = processor.tokenizer
    eos, _ = sampler.default_token_ids(model)
    greedy_key = jax.random.wrap_key_data(jax.device_put(np.zeros(2, np.uint32)))  # key(0), unused
    answers = []
    for batch in batches:
        out = sampler.generate(
            model, batch.arrays, rng=greedy_key, max_new_tokens=max_new_tokens,
            temperature=0.0, cache_dtype=model.cfg.dtype,
        )  # fmt: skip
        tokens, mask, logps = host.local_values((out.tokens, out.mask, out.logprobs))
        cut = scoring.truncated(tokens, mask, eos) & (mask.sum(1) >= max_new_tokens)
        h = batch.host
        valid = np.nonzero(np.asarray(h.arrays["valid"], bool))[0]
        for i, target in zip(valid, h.targets(), strict=True):
            answers.append(
                answer_of(tokenizer, h.record_ids[i], tokens[i][mask[i]], logps[i][mask[i]],
                          target, cut[i], rc, score)
            )  # fmt: skip
    return answers


def gather_answers(answers: list[Answer], tag: str = "eval") -> list[Answer]:
    """Every process's answers, process 0's first (exchanged as JSON through the key-value
    store, `host.kv_allgather`; one process: as they are)."""
    if jax.process_count() == 1:
        return answers
    parts = host.kv_allgather(f"visionr1_eval/{tag}", [a.to_json() for a in answers], series="eval")
    return [Answer.from_json(d) for part in parts for d in part]


def _set_of(record_id: str) -> str:
    """The ODINW set of a record id `<set>/<split>/<image_id>/<category_id>`."""
    return record_id.rsplit("/", 3)[0]


def _protocol_metrics(answers: Sequence[Answer], config) -> dict[str, float]:
    """detection: `detection_metrics` over all answers (one image each); odinw: per set (from
    the record id), each query its own image holding only its category's boxes, then
    `odinw_average` (`AP/<set>` per set); rec: `Acc@0.5` (`rec_accuracy`, first box)."""
    protocol = protocol_of(config)
    dets = tuple(config.eval.max_dets) if "eval" in config else (1, 10, 100)
    preds = [(a.boxes, a.labels, a.scores) for a in answers]
    targets = [a.target for a in answers]
    if protocol == "detection":
        return detection_metrics(preds, targets, max_dets=dets)
    if protocol == "odinw":
        sets: dict[str, list[int]] = {}
        for k, a in enumerate(answers):
            sets.setdefault(_set_of(a.record_id), []).append(k)
        per_set = {
            name: detection_metrics([preds[k] for k in ks], [targets[k] for k in ks],
                                    max_dets=dets)
            for name, ks in sorted(sets.items())
        }  # fmt: skip
        return odinw_average(per_set)
    return {"Acc@0.5": rec_accuracy([a.boxes for a in answers],
                                    [np.asarray(t.boxes)[0] for t in targets])}  # fmt: skip


def compute_metrics(answers: Sequence[Answer], config) -> dict[str, float]:
    """The protocol's metrics of `answers` (`protocol_of(config)`: `_protocol_metrics`), plus
    the reward's view of the same answers (`scoring.score`, the training's scoring path):
    `parse_rate` (official format check passed with >= 1 box), `format_rate` (official
    format check passed), `matched_iou` (mean IoU over all the reward matcher's pairs; 0 if
    none), `num_matched` (those pairs), `truncated_rate` (answers that hit the budget without
    a stop token), `num_examples`."""
    if not answers:
        raise ValueError("no answer to evaluate (the evaluation split is empty?)")
    out = _protocol_metrics(answers, config)
    rc = scoring.reward_config(config)
    terms = scoring.score([a.completion for a in answers], [a.target for a in answers], rc)
    fmt = terms["parse_rate"] == 1.0
    pairs = terms["boxes/matched"].astype(np.float64)
    iou = float((terms["matched_iou"].astype(np.float64) * pairs).sum())
    out["parse_rate"] = float((fmt & (terms["boxes/parsed"] >= 1)).mean())
    out["format_rate"] = float(fmt.mean())
    out["matched_iou"] = iou / pairs.sum() if pairs.sum() else 0.0
    out["num_matched"] = float(pairs.sum())
    out["truncated_rate"] = float(np.mean([a.truncated for a in answers]))
    out["num_examples"] = len(answers)
    return {k: float(v) for k, v in out.items()}


def evaluate(model, processor, config, mesh, *, tag: str = "eval") -> tuple[dict, list[Answer]]:
    """Greedy evaluation of `model` on the run's evaluation split (`eval` section, defaults
    from `eval_config()`), sharded over `mesh`: every process decodes its rows, the answers are
    gathered (`gather_answers`) and every process computes the metrics of all of them.

    Returns:
      `(metrics, answers)`: `compute_metrics` of all answers, and the answers.
    """
    c = config.eval if "eval" in config else eval_config()
    data = data_config_lib.eval_config(config.data)
    if c.get("batch_size"):
        data.batch_size = int(c.batch_size)
    inner = pipeline.InputPipeline(data, processor)
    pipe = pipeline.DevicePrefetch(inner, mesh)
    total = min(c.batches or inner.num_batches, inner.num_batches)
    bar = metrics_lib.Progress(total, enabled=config.get("progress", True), desc=tag)
    try:
        batches = itertools.islice(pipe, c.batches) if c.batches else pipe
        with jax.set_mesh(mesh):
            mine = predict(model, processor, _counted(batches, bar), config,
                           max_new_tokens=int(c.max_new_tokens), score=c.score)  # fmt: skip
    finally:
        bar.close()
        pipe.close()
    answers = gather_answers(mine, tag)
    return compute_metrics(answers, config), answers


def _counted(batches, bar):
    """`batches`, advancing the progress bar after each one is used."""
    for batch in batches:
        yield batch
        bar.update(1, {})


def write_results(workdir: str, tag: str, metrics: Mapping, answers, config, step) -> str:
    """Process 0 writes `<workdir>/eval/<tag>.json` (the metrics, the step, the protocol and
    the `eval` section) and, with `eval.save_predictions`, `<tag>_predictions.jsonl`.
    Returns the JSON path. The workdir may be remote; each file is written whole (never
    half-written: `fs.write_text`)."""
    directory = fs.join(workdir, "eval")
    path = fs.join(directory, f"{tag}.json")
    if jax.process_index() != 0:
        return path
    c = config.eval if "eval" in config else eval_config()
    record = {
        "tag": tag,
        "step": step,
        "protocol": protocol_of(config),
        "metrics": dict(metrics),
        "eval": c.to_dict(),
    }
    fs.write_json(path, record, indent=1)
    if c.save_predictions:
        lines = "".join(json.dumps(a.to_json()) + "\n" for a in answers)
        fs.write_text(fs.join(directory, f"{tag}_predictions.jsonl"), lines)
    return path


TABLE_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10",
              "AR100", "Acc@0.5", "parse_rate", "matched_iou", "truncated_rate",
              "num_examples")  # fmt: skip


def format_table(metrics: Mapping[str, float], title: str = "") -> str:
    """The metrics as a two-column Markdown table (the main ones first, then the rest)."""
    keys = [k for k in TABLE_KEYS if k in metrics]
    keys += sorted(k for k in metrics if k not in keys)
    lines = [f"{title}\n" if title else "", "| metric | value |", "|---|---|"]
    for k in keys:
        v = metrics[k]
        lines.append(f"| {k} | {int(v) if k.startswith('num_') else f'{v:.4f}'} |")
    return "\n".join(lines).lstrip("\n")


def load_for_eval(config, workdir: str, checkpoint: str | None, mesh):
    """The model to evaluate and its tag/step: `checkpoint` None → the newest checkpoint of the
    run in `workdir` (the config's base model when it has none), an int → that step, `base`
    → the config's model (`model.checkpoint`, or the tiny one), a directory → that Hugging
    Face checkpoint (e.g. an export). Returns `(model, processor, tag, step)`."""
    path = loading.checkpoint_path(config, workdir)
    step = None
    if checkpoint not in (None, "", "base") and not str(checkpoint).isdigit():
        path, tag = str(checkpoint), "hf_" + os.path.basename(os.path.normpath(str(checkpoint)))
    else:
        tag = "base"
    with jax.set_mesh(mesh):
        model = loading.load_model(config, path, mesh)
    if tag == "base" and checkpoint != "base":
        wanted = int(checkpoint) if checkpoint else None
        if wanted is not None or fs.isdir(fs.join(workdir, "checkpoints")):
            # a run's checkpoint: its trainable parameters into the model
            _, _, like = nnx.split(model, state.frozen_filter(config), ...)
            try:
                loaded, step = checkpoint_lib.load_params(workdir, wanted, like)
            except FileNotFoundError:
                if wanted is not None:
                    raise
                loaded = None
            if loaded is not None:
                nnx.update(model, loaded)
                tag = f"step_{step}"
    return model, processing.load_processor(path), tag, step


def run(config, workdir: str, checkpoint: str | None = None) -> dict[str, float]:
    """`python -m visionr1_jax.evaluate`: loads the model (`load_for_eval`), evaluates it
    (`evaluate`), writes `<workdir>/eval/<tag>.json` (+ predictions), TensorBoard scalars
    `eval/*` at the checkpoint's step, and prints the table. Returns the metrics."""
    config_lib.validate(config)
    mesh = loading.make_run_mesh(config)
    model, processor, tag, step = load_for_eval(config, workdir, checkpoint, mesh)
    out, answers = evaluate(model, processor, config, mesh, tag=tag)
    path = write_results(workdir, tag, out, answers, config, step)
    if jax.process_index() == 0:
        if (config.get("metrics") or {}).get("tensorboard", True):
            tb = metrics_lib.TensorBoardWriter(workdir)
            tb.scalars(step or 0, {f"eval/{k}": v for k, v in out.items()})
            tb.close()
        print(format_table(out, f"{protocol_of(config)} evaluation of {tag} ({path})"))
    return out


def main(argv) -> None:
    """The command line: its config and paths checked first (a mistake is one line and exit
    status 2: `preflight`, `cli.run`), then `run`."""
    if len(argv) > 1:
        raise preflight.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir, checkpoint = (_FLAGS[k].value for k in ("config", "workdir", "checkpoint"))
    preflight.check_evaluation(config, workdir, checkpoint)
    host.initialize_distributed(
        _FLAGS["coordinator_address"].value,
        _FLAGS["num_processes"].value,
        _FLAGS["process_id"].value,
    )
    run(config, workdir, checkpoint)


_FLAGS: dict = {}

if __name__ == "__main__":
    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Run config file.")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The run's directory (or gs://).")
    _FLAGS["checkpoint"] = flags.DEFINE_string(
        "checkpoint", None, "Step of the run's checkpoint (default: newest), 'base', or a "
        "Hugging Face checkpoint directory.",
    )  # fmt: skip
    _FLAGS["coordinator_address"] = flags.DEFINE_string("coordinator_address", None, "host:port")
    _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None, "Processes.")
    _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None, "This process's index.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
