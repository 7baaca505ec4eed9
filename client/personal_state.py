"""The personal part of a user's adapters, kept on the device's disk between rounds and
across restarts of the client or of the run; written atomically (temporary file, rename),
so a crash mid-write leaves the previous state intact."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from shared.paths import atomic_write_bytes
from shared.user_store import UserStore

_SEPARATOR = "::"


def personal_path(store: UserStore, run_name: str) -> Path:
    """Where the personal parameters of `run_name` live in the user's store."""
    if not run_name or "/" in run_name or run_name.startswith("."):
        raise ValueError(f"run name {run_name!r} cannot name a file")
    return store.path / "personal" / f"{run_name}.safetensors"


def save_personal_state(store: UserStore, run_name: str, personal: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write {adapter: {key: tensor}} to the store, atomically."""
    flat = {f"{adapter}{_SEPARATOR}{key}": tensor.detach().cpu().contiguous()
            for adapter, state in personal.items() for key, tensor in state.items()}
    path = personal_path(store, run_name)
    atomic_write_bytes(path, save(flat))
    return path


def load_personal_state(store: UserStore, run_name: str) -> dict[str, dict[str, torch.Tensor]] | None:
    """The saved personal parameters, or None before the user's first round."""
    path = personal_path(store, run_name)
    if not path.is_file():
        return None
    try:
        flat = load(path.read_bytes())
    except SafetensorError as error:
        raise ValueError(f"personal parameters {path} are unreadable ({error}); move the file away to start "
                         "this user afresh") from None
    personal: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        adapter, key = name.split(_SEPARATOR, 1)
        personal.setdefault(adapter, {})[key] = tensor
    return personal
