"""Loading a base causal LM (4-bit NF4 or unquantized, on CUDA or the CPU) and its tokenizer,
frozen, from a named base (`shared.named_bases`, built or converted on first use) or a local
Hugging Face folder. Running it is `shared.forward`."""

from __future__ import annotations

import logging
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from shared.base_model import ensure_embedded_base
from shared.config import BaseSpec
from shared.errors import ModelLoadError, one_line
from shared.named_bases import NAMED_BASES, PRETRAINED, SIZES
from shared.pretrained_base import ensure_pretrained_base

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return resolved


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, float32 elsewhere."""
    if compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, compute_dtype)


def resolve_model_dir(model: str) -> Path:
    """The directory of `model`: the embedded default (built on first use) or a local directory."""
    if model in SIZES:
        return ensure_embedded_base(model)
    if model in PRETRAINED:
        return ensure_pretrained_base(model)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"base model {model!r}: not one of {', '.join(NAMED_BASES)} or an existing local model directory "
            "(nothing is downloaded; pass a folder holding config.json and the weights)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {path} has no config.json: not a Hugging Face model folder")
    return path


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(f"base model {model_dir}: its tokenizer cannot be loaded: {one_line(error)}") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(spec: BaseSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model and tokenizer described by `spec`, frozen, in eval mode."""
    model_dir = resolve_model_dir(spec.model)
    return load_causal_lm(model_dir, spec), load_tokenizer(model_dir)


def load_causal_lm(model_dir: Path, spec: BaseSpec) -> PreTrainedModel:
    """The causal LM in `model_dir`, quantized and placed as `spec` says, frozen, in eval mode."""
    device = resolve_device(spec.device)
    compute_dtype = resolve_compute_dtype(spec.compute_dtype, device)
    if spec.quantization == "nf4":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        model = _from_pretrained(
            model_dir, quantization_config=quantization, dtype=compute_dtype, device_map={"": str(device)}
        )
        keep_4bit_layers_trainable(model)
    else:
        dtype = compute_dtype if device.type == "cuda" else torch.float32
        model = _from_pretrained(model_dir, dtype=dtype).to(device)
    model.requires_grad_(False)
    model.eval()
    log.info("loaded base %s (%s) on %s", model_dir, spec.quantization, device)
    return model


def _from_pretrained(model_dir: Path, **options) -> PreTrainedModel:
    """transformers' loader, with what a broken model folder raises (no weights, an invalid
    config.json, a corrupt weights file) turned into one error naming the folder."""
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, **options)
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(f"base model {model_dir} cannot be loaded: {one_line(error)}") from error


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a 4-bit layer's weights for CPU inference the first time it runs
    in eval mode (on CPUs with AVX512-BF16), one way only; training through the layer then
    fails. We alternate training and evaluation on one resident base, so keep the layout
    that serves both."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
