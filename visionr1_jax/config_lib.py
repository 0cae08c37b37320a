"""Shared config pieces and validation (big_vision style).

Every run config is a file in ``configs/`` with ``get_config(arg=None) -> ConfigDict``;
variants come through ``--config=configs/x.py:variant`` (or ``key=value,key2=value``) and
single values through ``--config.a.b=value``. ``validate`` runs before anything compiles and
rejects a bad value with a message naming the key and the allowed range.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from visionr1_jax import rewards

_DTYPES = ("float32", "bfloat16", "float16")
_REMAT = ("none", "full", "dots", "dots_no_batch")


def parse_arg(arg: str | None, **defaults):
    """Parses ``"variant"`` or ``"k=v,k2=v2"`` into a ConfigDict over ``defaults``.

    A bare word sets the first default key; values are cast to the default's type.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    first = next(iter(defaults), None)
    for item in arg.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = first, key
        if key not in defaults:
            raise ValueError(f"config arg {key!r} is not one of {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.lower() in ("1", "true", "yes")
        elif defaults[key] is None:
            out[key] = value
        else:
            out[key] = kind(value)
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path/to/config.py[:arg]`` like ``config_flags.DEFINE_config_file`` does."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(f"config file {path!r} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def mesh_config(ici=(-1, 1, 1), dcn=(1, 1, 1)) -> ml_collections.ConfigDict:
    """The ``mesh`` section: ICI and DCN parallelism over ``('data', 'fsdp', 'tensor')``; one
    entry may be -1 (all remaining devices)."""
    return ml_collections.ConfigDict({"ici_parallelism": tuple(ici), "dcn_parallelism": tuple(dcn)})


def _check_parallelism(values, key: str) -> None:
    values = tuple(values)
    if len(values) != 3 or not all(isinstance(v, int) and (v >= 1 or v == -1) for v in values):
        raise ValueError(f"{key}={values!r} must be 3 ints >= 1 over (data, fsdp, tensor); -1 once")
    if sum(v == -1 for v in values) > 1:
        raise ValueError(f"{key}={values!r} may hold -1 at most once")


def _validate_model(c) -> None:
    for key in ("param_dtype", "dtype"):
        if c.get(key) not in _DTYPES:
            raise ValueError(f"model.{key}={c.get(key)!r} must be one of {list(_DTYPES)}")
    if c.get("remat_policy") not in _REMAT:
        raise ValueError(f"model.remat_policy={c.get('remat_policy')!r} must be one of {_REMAT}")
    if not isinstance(c.get("scan_layers", False), bool):
        raise ValueError(f"model.scan_layers={c.get('scan_layers')!r} must be True or False")
    chunk = c.get("logprob_chunk")
    if chunk is not None and (not isinstance(chunk, int) or chunk <= 0):
        raise ValueError(f"model.logprob_chunk={chunk!r} must be a positive integer or None")
    step = c.get("init_step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"model.init_step={step!r} must be an integer >= 0 or None")
    if step is not None and not c.get("init_from"):
        raise ValueError(f"model.init_step={step} has no effect without model.init_from")
    if c.get("tokenizer") not in ("small", "qwen"):
        raise ValueError(f"model.tokenizer={c.get('tokenizer')!r} must be 'small' or 'qwen'")
    lora = c.get("lora")
    if lora is not None:
        from visionr1_jax.models import qwen_vl

        rank = lora.get("rank", 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"model.lora.rank={rank!r} must be an integer >= 0 (0 = off)")
        targets = tuple(lora.get("targets") or ())
        unknown = [t for t in targets if t not in qwen_vl.LORA_TARGETS]
        if unknown:
            raise ValueError(f"model.lora.targets {unknown} not in {qwen_vl.LORA_TARGETS}")
        alpha = lora.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
            raise ValueError(f"model.lora.alpha={alpha!r} must be a number > 0")
        if rank and not targets:
            raise ValueError(f"model.lora.rank={rank} has no effect with no lora.targets")
        if rank and c.get("freeze_vision_tower"):
            raise ValueError(
                "model.freeze_vision_tower has no effect with model.lora.rank > 0 (only the "
                "adapters train)"
            )


def data_max_patches(data: ml_collections.ConfigDict, patch_size: int = 14, merge: int = 2) -> int:
    """The most patches the data's smart resize gives one image: (max_pixels // (p·m)²)·m²
    (2,048 for SPEC §5's 401,408 pixels; p = 14, m = 2 for every Qwen2/2.5-VL)."""
    return (int(data.max_pixels) // (patch_size * merge) ** 2) * merge**2


def max_image_patches(config: ml_collections.ConfigDict) -> int | None:
    """The vision tower's static per-image bound of a run (`QwenVLConfig.max_image_patches`):
    `model.max_image_patches` when set, else what `data.max_pixels` produces. One derived
    value, so the bound follows the run's data rather than the checkpoint's processor (whose
    `max_pixels` is 12,845,056 for Qwen2.5-VL-7B-Instruct: 65,536 patches, which would make the
    full-attention blocks of a packed 16 x 2,048-patch batch dense). None: no data section."""
    bound = config.model.get("max_image_patches") if "model" in config else None
    if bound is not None:
        return int(bound)
    return data_max_patches(config.data) if "data" in config else None


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates every section present; returns the config for chaining."""
    if "reward" in config:
        rewards.validate_config(config.reward, "reward")
    if "data" in config:
        from visionr1_jax.data.config import validate_data_config

        validate_data_config(config.data)
    if "reward" in config and "data" in config:
        # The prompts ask for one coordinate frame and the reward parses answers in one: the
        # two must be the same, or every box is rescaled wrongly without an error.
        from visionr1_jax.data.config import frame_of

        data_frame, reward_frame = frame_of(config.data), config.reward.frame
        if data_frame != reward_frame:
            implied = (
                "" if config.data.frame else f", implied by data.template={config.data.template!r}"
            )
            raise ValueError(
                f"data.frame={data_frame!r}{implied} and reward.frame={reward_frame!r} differ: "
                "the reward must read answers in the frame the prompts ask for; set both"
            )
    if "model" in config:
        _validate_model(config.model)
        bound = config.model.get("max_image_patches")
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
            raise ValueError(f"model.max_image_patches={bound!r} must be a positive int or None")
        if bound is not None and "data" in config:
            needed = data_max_patches(config.data)
            if bound < needed:
                raise ValueError(
                    f"model.max_image_patches={bound} is below the {needed} patches that "
                    f"data.max_pixels={config.data.max_pixels} produces: such images would come "
                    "out NaN; raise it or leave it None (derived from data.max_pixels)"
                )
    if "mesh" in config:
        _check_parallelism(config.mesh.ici_parallelism, "mesh.ici_parallelism")
        _check_parallelism(config.mesh.dcn_parallelism, "mesh.dcn_parallelism")
    if "grpo" in config or "optim" in config:
        from visionr1_jax import train

        train.validate_config(config)
    if "sft" in config:
        from visionr1_jax import sft

        sft.validate_config(config)
    if "checkpoint" in config:
        from visionr1_jax import checkpoint

        checkpoint.validate_config(config)
    if "metrics" in config:
        from visionr1_jax import metrics

        metrics.validate_config(config)
    if "eval" in config:
        from visionr1_jax import evaluate

        evaluate.validate_config(config)
    if "experiment" in config:
        from visionr1_jax import experiment

        experiment.validate_config(config)
    for key in ("seed", "total_steps"):
        if key in config:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key}={value!r} must be an integer >= 0")
    return config
