"""The coordinator's checkpoint: shared state, phase, round and expert digest, written
atomically every round so a restarted coordinator resumes where it stopped."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from shared.paths import atomic_write_bytes, atomic_write_json

PHASES = ("expert", "personalize", "evaluate", "done")
STATE_FILE = "checkpoint.safetensors"
META_FILE = "checkpoint.json"


@dataclass
class Checkpoint:
    phase: str
    round: int  # rounds of `phase` completed
    expert_digest: str | None = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"checkpoint phase must be one of {PHASES}, got {self.phase!r}")


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """State first, then the metadata that names it: a crash between the two leaves the
    previous metadata, which the previous state still matches in keys and shapes."""
    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / STATE_FILE, save({k: v.contiguous() for k, v in checkpoint.shared.items()}))
    meta = {k: v for k, v in asdict(checkpoint).items() if k != "shared"}
    atomic_write_json(run_dir / META_FILE, meta)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    run_dir = Path(run_dir)
    meta_path = run_dir / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        shared = load((run_dir / STATE_FILE).read_bytes())
    except (OSError, ValueError, SafetensorError) as error:
        raise ValueError(f"checkpoint in {run_dir} is unreadable ({error}); move it away to start afresh") from None
    return Checkpoint(shared=shared, **meta)
