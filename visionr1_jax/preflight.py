"""A run's mistakes found before anything starts: the config and every path it names.

The command lines (`main`, `evaluate`, `tools/export`, `tools/aot`) call these first, before
the mesh, the model or any compilation, and before anything is written; `cli.run` prints a
`UsageError` as one line, `error: <key>=<value>: <problem>`, and exits with status 2. What
`check(config, workdir)` checks, every path local or remote (through `fs`), reading only
listings and small JSON files:

- the config: `config_lib.validate` (its messages name the key);
- the workdir: a local one is a folder, or can be made inside a writable one (nothing is
  created here);
- `model.checkpoint`: a folder with a `config.json` of a Qwen2-VL or Qwen2.5-VL model, its
  weights (`*.safetensors`, or an index whose shards are all there) and tokenizer files;
- `model.init_from`: a run's workdir with a saved checkpoint (`model.init_step` among them);
- the data: a tfds dataset is built under `data.data_dir`, except the ones built on first
  use (`synthetic_shapes`; `coco_format`, whose files `validate` checks).

A path in a placeholder bucket (the configs' `gs://YOUR_BUCKET/...`, the README's
`gs://BUCKET/...`) is named as such rather than looked up.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import ml_collections

from visionr1_jax import config_lib, fs

T = TypeVar("T")

HF_FOLDER = "expected a Hugging Face checkpoint folder"
RUN_FOLDER = "expected the workdir of a run that saved a checkpoint"
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
# Datasets a single-process run builds on first use (`data.pipeline.open_source`).
BUILT_ON_FIRST_USE = ("synthetic_shapes", "coco_format")
# The configs' and the README's bucket placeholders (upper case: never a real bucket's name).
_PLACEHOLDER = re.compile(r"gs://((YOUR_)?BUCKET)(/|$)")


class UsageError(ValueError):
    """A mistake in the command line or the config. The message is one line naming the key and
    the problem (`key=value: problem`); `cli.run` prints it as `error: <message>` and exits
    with status 2."""


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config_lib.validate`, its ValueError (which names the key) as a UsageError."""
    try:
        return config_lib.validate(config)
    except ValueError as e:
        raise UsageError(str(e)) from e


def check(
    config: ml_collections.ConfigDict, workdir: str, *, model_checkpoint: bool = True
) -> ml_collections.ConfigDict:
    """Validates `config` and the paths a run of it in `workdir` reads and writes (the module
    docstring's list); `model_checkpoint=False` skips `model.checkpoint` (an evaluation of
    another checkpoint folder). Returns the config.

    Raises:
      UsageError: the first mistake found.
    """
    validate(config)
    check_workdir("--workdir", workdir)
    m = config.get("model") or {}
    if model_checkpoint and m.get("checkpoint"):
        check_hf_checkpoint("model.checkpoint", str(m.checkpoint))
    if m.get("init_from"):
        check_run(str(m.init_from), m.get("init_step"), "model.init_from", "model.init_step")
    if "data" in config:
        check_dataset(config.data)
    reference = (config.get("experiment") or {}).get("reference_results")
    if reference and not _probe("experiment.reference_results", reference, fs.exists):
        raise UsageError(
            f"experiment.reference_results={reference}: no such file (the committed multi-seed "
            "record, written by benchmarks/demo_seeds.py; empty: none)"
        )
    return config


def check_evaluation(
    config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None
) -> ml_collections.ConfigDict:
    """`check` for `python -m visionr1_jax.evaluate --checkpoint=...` (`evaluate.load_for_eval`
    reads the flag): a step must be saved in the run's workdir; any other value but `base` is
    a Hugging Face checkpoint folder (and `model.checkpoint` is not read). Returns the config."""
    step = str(checkpoint).isdigit()
    folder = checkpoint not in (None, "", "base") and not step
    check(config, workdir, model_checkpoint=not folder)
    if folder:
        check_hf_checkpoint("--checkpoint", str(checkpoint))
    elif step:
        check_run(workdir, int(checkpoint), "--workdir", "--checkpoint")
    return config


def check_workdir(key: str, path: str) -> None:
    """A local `path` is a folder, or can be made: its nearest existing ancestor is a writable
    folder. A remote one is only checked for a placeholder bucket (an object store has no
    folders to make, and writing is the only test of permission)."""
    _not_placeholder(key, path)
    if fs.is_remote(path):
        return
    # Local only (remote paths returned above): the standard library tells writability.
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise UsageError(f"{key}={path}: not a folder")
    parent = full
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{key}={path}: cannot be made: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{key}={path}: cannot write there: {parent} is not writable")


def check_hf_checkpoint(key: str, path: str) -> None:
    """`path` is a Hugging Face Qwen2-VL / Qwen2.5-VL checkpoint folder: `config.json` (JSON
    with a supported `model_type`), weights (`*.safetensors`, or a
    `model.safetensors.index.json` whose shards are all there) and tokenizer files."""
    _not_placeholder(key, path)
    if not _probe(key, path, fs.isdir):
        what = "not a folder" if _probe(key, path, fs.exists) else "no such folder"
        raise UsageError(f"{key}={path}: {what} ({HF_FOLDER})")
    names = set(_probe(key, path, fs.listdir))
    if "config.json" not in names:
        raise UsageError(f"{key}={path}: no config.json ({HF_FOLDER})")
    hf_config = _read_json(key, path, "config.json")
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type not in MODEL_TYPES:
        raise UsageError(
            f"{key}={path}: config.json has model_type={model_type!r} (expected "
            f"{' or '.join(MODEL_TYPES)})"
        )
    index = "model.safetensors.index.json"
    if index in names:
        weight_map = _read_json(key, path, index)
        shards = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(shards, dict):
            raise UsageError(f"{key}={path}: {index} has no weight_map")
        missing = sorted(set(shards.values()) - names)
        if missing:
            raise UsageError(f"{key}={path}: {index} names {missing[0]}, which is missing")
    elif not any(n.endswith(".safetensors") for n in names):
        raise UsageError(f"{key}={path}: no weights (no *.safetensors file and no {index})")
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise UsageError(
            f"{key}={path}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
        )


def check_run(
    workdir: str, step: int | None, key: str = "--workdir", step_key: str = "--step"
) -> list[int]:
    """`workdir` is a run's workdir with saved checkpoints (`<workdir>/checkpoints/<step>`),
    `step` (None: any) among them; `key` and `step_key` name the two in the message. Returns
    the saved steps, ascending."""
    _not_placeholder(key, workdir)
    if not _probe(key, workdir, fs.isdir):
        raise UsageError(f"{key}={workdir}: no such folder ({RUN_FOLDER})")
    directory = fs.join(workdir, "checkpoints")
    names = _probe(key, workdir, lambda _: fs.listdir(directory) if fs.isdir(directory) else [])
    steps = sorted(int(n) for n in names if n.isdigit())  # an unfinished save has a suffix
    if not steps:
        raise UsageError(f"{key}={workdir}: no checkpoint in {directory} ({RUN_FOLDER})")
    if step is not None and int(step) not in steps:
        raise UsageError(
            f"{step_key}={step}: no checkpoint of step {step} in {directory} (saved: {steps})"
        )
    return steps


def check_dataset(data: ml_collections.ConfigDict) -> None:
    """The tfds dataset `data.name/data.builder_config` is built under `data.data_dir` (a
    version folder holding `dataset_info.json`, as tfds's `is_prepared`), unless it is built on
    first use."""
    if data.name in BUILT_ON_FIRST_USE:
        return
    key, data_dir = "data.data_dir", data.data_dir
    if data_dir is not None:
        _not_placeholder(key, data_dir)
    # tfds's own default (tensorflow_datasets.core.constants.get_default_data_dir).
    root = data_dir or os.environ.get(
        "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )
    name = f"{data.name}/{data.builder_config}"
    folder = fs.join(root, name)

    def built(_: str) -> bool:
        if not fs.isdir(folder):
            return False
        versions = (fs.join(folder, v) for v in fs.listdir(folder) if re.fullmatch(r"[\d.]+", v))
        return any(fs.exists(fs.join(v, "dataset_info.json")) for v in versions)

    if not _probe(key, root, built):
        where = "there" if data_dir else f"in {root} (tfds's default)"
        raise UsageError(
            f"{key}={data_dir}: {name} is not built {where}; build it once: python -m "
            f"visionr1_jax.data.tfds_cli build {data.name} --config {data.builder_config} "
            f"--imports visionr1_jax.data.builders --file_format array_record --data_dir "
            f"{root} [--manual_dir DIR]"
        )


def _not_placeholder(key: str, path: str) -> None:
    found = _PLACEHOLDER.match(str(path))
    if found:
        flag = key if key.startswith("--") else f"--config.{key}"
        rest = str(path)[found.end() :]
        raise UsageError(
            f"{key}={path}: {found.group(1)} is a placeholder; pass "
            f"{flag}=gs://<your bucket>/{rest}"
        )


def _probe(key: str, path: str, look: Callable[[str], T]) -> T:
    """`look(path)`; a failure to read (no permission, no network, a missing bucket) as a
    UsageError naming the key."""
    try:
        return look(path)
    except Exception as e:  # any file system's error: the path cannot be read
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"{key}={path}: cannot read it ({type(e).__name__}: {first})") from e


def _read_json(key: str, path: str, name: str) -> Any:
    raw = _probe(key, path, lambda p: fs.read_bytes(fs.join(p, name)))
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        where = f"{e.msg} at line {e.lineno} column {e.colno}"
        raise UsageError(f"{key}={path}: {name} is not JSON ({where})") from e
    except UnicodeDecodeError as e:
        raise UsageError(f"{key}={path}: {name} is not JSON (not UTF-8 text)") from e
