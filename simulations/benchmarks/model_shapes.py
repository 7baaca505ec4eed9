"""Models of a published shape with random weights, for benchmarks on machines that cannot
download the model (or carry it: a lent GPU machine takes 64 MiB a call). A step's time and
memory depend on the shapes, not on the weights' values; what needs text (a simulation of
users, a client round) also needs a tokenizer, copied in from a directory that holds one.

  qwen2.5-0.5b-shape   Qwen2.5-0.5B's config.json (24 layers, hidden 896, vocabulary 151,936)
  smollm2-135m-shape   SmolLM2-135M-Instruct's (30 layers, hidden 576, vocabulary 49,152), as
                       the pinned GGUF converts to
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from shared.loading import resolve_model_dir
from shared.paths import atomic_directory, data_dir

QWEN_SHAPE = "qwen2.5-0.5b-shape"
SMOLLM2_SHAPE = "smollm2-135m-shape"

SHAPES: dict[str, tuple[type, type, dict]] = {
    QWEN_SHAPE: (Qwen2Config, Qwen2ForCausalLM, {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    }),
    SMOLLM2_SHAPE: (LlamaConfig, LlamaForCausalLM, {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    }),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def shaped_model_dir(name: str, tokenizer_from: Path | None = None) -> Path:
    """The model directory of shape `name` with random weights (seed 0), saved once under the
    data directory like a downloaded model; with `tokenizer_from`, that directory's tokenizer
    files are copied in (the copy is made once; a directory with a tokenizer keeps it)."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    target = data_dir() / "models" / name
    if not (target / "config.json").is_file():
        config_class, model_class, values = SHAPES[name]
        torch.manual_seed(0)
        with atomic_directory(target, overwrite=True) as staging:
            model_class(config_class(**values)).save_pretrained(staging)
    if tokenizer_from is not None and not (target / "tokenizer_config.json").is_file():
        source = Path(tokenizer_from)
        if not (source / "tokenizer_config.json").is_file():
            raise FileNotFoundError(f"{source} holds no tokenizer (no tokenizer_config.json)")
        for file in TOKENIZER_FILES:
            if (source / file).is_file():
                shutil.copyfile(source / file, target / f".{file}.partial")
        # tokenizer_config.json last: its presence marks the copy complete
        for file in sorted(TOKENIZER_FILES, key=lambda f: f == "tokenizer_config.json"):
            if (target / f".{file}.partial").is_file():
                (target / f".{file}.partial").replace(target / file)
    return target


def model_dir_for(model: str, tokenizer_from: Path | None = None) -> Path:
    """A shape name, a named base or a local model directory, as a model directory."""
    return shaped_model_dir(model, tokenizer_from) if model in SHAPES else resolve_model_dir(model)
