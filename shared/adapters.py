"""LoRA adapters: settings, attaching to a (4-bit) base, atomic save, content digests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError

from shared.adapter_files import ADAPTER_FILES, adapter_digest
from shared.config import LoraSettings
from shared.errors import AdapterLoadError, one_line
from shared.paths import atomic_directory, atomic_write_json

METADATA_FILE = "nextquill.json"


def lora_config(settings: LoraSettings) -> LoraConfig:
    """PEFT's config of the LoRA `settings` describe."""
    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.target_modules), task_type="CAUSAL_LM")


class AdapterHost:
    """A base model kept resident while named LoRA adapters are added, loaded, switched and
    dropped: the base is loaded once, never per user or per method."""

    def __init__(self, base: torch.nn.Module, settings: LoraSettings) -> None:
        if getattr(base, "is_loaded_in_4bit", False):
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        self._base = base
        self.settings = settings
        self.model: PeftModel | None = None

    @property
    def base(self) -> torch.nn.Module:
        return self._base

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config) if self.model is not None else []

    def new(self, *names: str, seed: int = 0) -> PeftModel:
        """Freshly initialised trainable adapters `names` (deterministic from `seed`), made the
        active ones (several at once for a shared + personal pair). An adapter of that name
        that exists already is re-initialised in place: a simulated client per user would
        otherwise delete and rebuild every LoRA module of the model, the larger part of its
        set-up."""
        if not names:
            raise ValueError("name at least one adapter")
        for name in names:
            if self.model is None:
                self.model = get_peft_model(self._base, lora_config(self.settings), adapter_name=name)
            elif name not in self.adapters:
                self.model.add_adapter(name, lora_config(self.settings))
        # One initialisation for created and reused adapters alike, so that the values depend
        # on the seed alone.
        torch.manual_seed(seed)
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, LoraLayer):
                    for name in names:
                        if name in module.lora_A:
                            module.reset_lora_parameters(name, init_lora_weights=True)
        return self.activate(*names, trainable=True)

    def load(self, name: str, adapter_dir: Path, trainable: bool = False) -> PeftModel:
        """Load a saved adapter (plain PEFT format) as `name` and make it the active one. A
        corrupt adapter, or one whose layers do not fit this base, raises AdapterLoadError."""
        adapter_dir = Path(adapter_dir)
        missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"adapter directory {adapter_dir} lacks {', '.join(missing)}")
        self.drop(name)
        try:
            if self.model is None:
                self.model = PeftModel.from_pretrained(self._base, adapter_dir, adapter_name=name,
                                                       is_trainable=trainable)
            else:
                self.model.load_adapter(adapter_dir, adapter_name=name, is_trainable=trainable)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
            # RuntimeError: PEFT's state-dict load reports layers of another shape (another base).
            self.drop(name)
            reason = ("its layers' shapes differ from this base's (was it made for another base?)"
                      if "size mismatch" in str(error) else one_line(error))
            raise AdapterLoadError(f"adapter {adapter_dir} cannot be loaded on this base: {reason}") from error
        self.activate(name, trainable=trainable)
        return self.model

    def activate(self, *names: str, trainable: bool = False) -> PeftModel:
        """Make `names` the active adapters (all others off), trainable or frozen."""
        self.model.base_model.set_adapter(list(names))
        for param_name, param in self.model.named_parameters():
            if "lora_" in param_name:
                param.requires_grad_(trainable and any(f".{name}." in param_name for name in names))
        return self.model

    def drop(self, name: str) -> None:
        """Remove adapter `name` if present (PEFT needs one adapter left, so the last one stays
        until another replaces it)."""
        if name in self.adapters and len(self.adapters) > 1:
            if name in self.model.active_adapters:
                self.activate(next(a for a in self.adapters if a != name))
            self.model.delete_adapter(name)


def save_adapter(model: PeftModel, target: Path, metadata: dict[str, Any] | None = None,
                 adapter_name: str = "default", overwrite: bool = False) -> str:
    """Save one adapter with PEFT's own format into `target`, atomically; returns its digest.
    A `target` that holds something is replaced only when `overwrite`."""
    with atomic_directory(Path(target), overwrite=overwrite) as staging:
        model.save_pretrained(staging, selected_adapters=[adapter_name])
        # PEFT puts non-default adapters in a subfolder; keep one flat layout.
        if adapter_name != "default":
            for name in ADAPTER_FILES:
                (staging / adapter_name / name).rename(staging / name)
            (staging / adapter_name).rmdir()
        digest = adapter_digest(staging)
        atomic_write_json(staging / METADATA_FILE, {**(metadata or {}), "adapter_digest": digest})
    return digest


def check_adapter_base(adapter_dir: Path, base_id: str) -> None:
    """Refuse an adapter that records (in its nextquill.json) another base than `base_id`, before
    loading it; an adapter saved elsewhere records none and is checked by its layers' shapes."""
    path = Path(adapter_dir) / METADATA_FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError, AttributeError) as error:
        raise AdapterLoadError(f"{path} cannot be read: {one_line(error)}") from error
    if recorded and recorded != base_id:
        raise AdapterLoadError(f"adapter {adapter_dir} was trained on another base (fingerprint {recorded}); "
                               f"this base's fingerprint is {base_id}: pass the --model it was made for")


def base_fingerprint(model_dir: Path) -> str:
    """A cheap identity of a base model directory: its config and the names and sizes of its
    weight files (hashing gigabytes of weights on every start would be slow)."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]
