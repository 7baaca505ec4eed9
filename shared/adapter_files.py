"""What identifies a saved LoRA adapter: its files and their content digest. Plain file
hashing, apart from `shared.adapters` so that a device can check and cache an expert (a
query message) without loading torch or PEFT."""

from __future__ import annotations

import hashlib
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_digest(adapter_dir: Path) -> str:
    """sha256 over the adapter's config and weights (names and bytes): its content identity."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = Path(adapter_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"adapter directory {adapter_dir} lacks {name}")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
