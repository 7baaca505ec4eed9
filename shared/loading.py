"""Loading a base causal LM (4-bit NF4 or unquantized, on CUDA or the CPU) and its tokenizer,
frozen, from a named base (`shared.named_bases`, built or converted on first use) or a local
Hugging Face folder. Running it is `shared.forward`."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import bitsandbytes as bnb
import torch
import transformers
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
from shared.paths import atomic_directory, data_dir, file_lock
from shared.pretrained_base import ensure_pretrained_base

log = logging.getLogger(__name__)

QUANTIZED_DIR = "quantized"  # in the data directory: 4-bit copies of the bases (`quantized_copy`)


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
        cache = quantized_copy(model_dir, quantization, device) if spec.quantized_cache else None
        model = _load_4bit(model_dir, quantization, cache, dtype=compute_dtype, device_map={"": str(device)})
        keep_4bit_layers_trainable(model)
    else:
        dtype = compute_dtype if device.type == "cuda" else torch.float32
        model = _from_pretrained(model_dir, dtype=dtype).to(device)
    model.requires_grad_(False)
    model.eval()
    log.info("loaded base %s (%s) on %s", model_dir, spec.quantization, device)
    return model


def quantized_copy(model_dir: Path, quantization: BitsAndBytesConfig, device: torch.device) -> Path:
    """Where the base in `model_dir`, quantized as `quantization` says for this kind of device,
    is kept: named by the base's files (name, size, modification time), the settings and the
    library versions, so that a changed base or library never reads a stale copy."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".json"))
    identity = {
        "base": str(model_dir.resolve()), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "quantization": quantization.to_dict(), "device": device.type,
        "bitsandbytes": bnb.__version__, "transformers": transformers.__version__,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return data_dir() / QUANTIZED_DIR / digest


def _load_4bit(model_dir: Path, quantization: BitsAndBytesConfig, cache: Path | None, **placement) -> PreTrainedModel:
    """The base in 4-bit: read from its quantized copy `cache` where there is one; otherwise
    quantized from `model_dir` (bitsandbytes quantizes with plain tensor ops on the CPU:
    `simulations/benchmarks/benchmarks.md`, section 7) and, with `cache`, kept there."""
    broken = False
    if cache is not None and _complete(cache):
        try:
            return _named(_from_pretrained(cache, **placement), model_dir)
        except Exception as error:  # noqa: BLE001  (any broken copy: quantize again, below)
            log.warning("the quantized copy %s cannot be loaded (%s): quantizing %s again", cache, one_line(error),
                        model_dir)
            broken = True
    model = _from_pretrained(model_dir, quantization_config=quantization, **placement)
    if cache is not None:
        try:
            with file_lock(cache.parent / f"{cache.name}.lock"):
                if broken or not _complete(cache):  # another process may have kept it meanwhile
                    with atomic_directory(cache, overwrite=True) as staging:
                        model.save_pretrained(staging)
        except Exception as error:  # noqa: BLE001  (a full disk costs the next load its speed, not this one its model)
            log.warning("the quantized base could not be kept at %s: %s", cache, one_line(error))
    return model


def _complete(cache: Path) -> bool:
    """Whether a complete copy is already at `cache` (its config and weights present)."""
    return (cache / "config.json").is_file() and any(cache.glob("*.safetensors"))


def _named(model: PreTrainedModel, model_dir: Path) -> PreTrainedModel:
    """A model read from its quantized copy, named after the base it is (PEFT records the name
    in every adapter's config)."""
    model.name_or_path = model.config._name_or_path = str(model_dir)
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
