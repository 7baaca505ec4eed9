"""The coordinator's checkpoint: shared state, phase, rounds done, run id and expert digest,
written every round so that a restarted coordinator resumes where it stopped.

One safetensors file holds the tensors and, in its header, the rest: one atomic rename
replaces both together, so state and round number can never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from shared.paths import atomic_write_bytes
from shared.wire import Phase

CHECKPOINT_FILE = "checkpoint.safetensors"
_META_KEY = "nextquill"


@dataclass
class Checkpoint:
    phase: Phase  # the phase under way
    round: int  # rounds of `phase` completed
    run_id: str  # names the devices' personal state of this run
    expert_digest: str | None = None
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # the phase's global shared parameters
    privacy: dict | None = None  # differential privacy spent so far (`coordinator.privacy.RunPrivacy.state`)

    def __post_init__(self) -> None:
        if self.phase not in tuple(Phase):
            raise ValueError(f"checkpoint phase must be one of {[p.value for p in Phase]}, got {self.phase!r}")
        self.phase = Phase(self.phase)


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    meta = {"phase": checkpoint.phase.value, "round": checkpoint.round, "run_id": checkpoint.run_id,
            "expert_digest": checkpoint.expert_digest, "privacy": checkpoint.privacy}
    tensors = {k: v.detach().cpu().contiguous() for k, v in checkpoint.shared.items()}
    path = Path(run_dir) / CHECKPOINT_FILE
    atomic_write_bytes(path, save(tensors, metadata={_META_KEY: json.dumps(meta)}))
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last checkpoint in `run_dir`, or None if the run has none yet."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as handle:  # one open file: state and metadata together
            meta = json.loads((handle.metadata() or {})[_META_KEY])
            shared = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        return Checkpoint(shared=shared, **meta)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise ValueError(f"checkpoint {path} is unreadable ({error}); move it away to start afresh") from None
