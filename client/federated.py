"""One federated round on a device, as plain functions (the ClientApp is a skin over them):
the user's adapters are rebuilt on the resident base from the shared parameters received
and the personal parameters on disk, trained locally, and only the shared part leaves."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from client.personal_state import load_personal_state, save_personal_state
from client.personalize import Device, Expert
from client.trainer import TrainConfig, train_adapter
from shared.data import UserStore
from shared.split import SplitSpec
from shared.wire import NUM_EXAMPLES


@dataclass(frozen=True)
class RoundResult:
    shared: dict[str, torch.Tensor]
    metrics: dict[str, float]


def train_round(
    device: Device,
    store: UserStore,
    split: SplitSpec,
    shared_in: dict[str, torch.Tensor] | None,
    config: TrainConfig,
    run_name: str,
    expert: Expert | None = None,
) -> RoundResult:
    """Train the user's adapters for one round; the personal part is saved in the store,
    the shared part and allow-listed numeric metrics are returned. `shared_in` None means
    the device starts the shared parameters itself (the coordinator's first initialisation)."""
    examples = device.examples([store], config, expert)
    model = device.host.new(*split.adapters, seed=config.seed)
    personal = load_personal_state(store, run_name)
    if personal is not None:
        split.load_personal(model, personal)
    if shared_in is not None:
        split.load_shared(model, shared_in)
    report = train_adapter(model, examples, device.tokenizer.pad_token_id, config, progress=False)
    save_personal_state(store, run_name, split.personal_state(model))
    summary = report.summary()
    return RoundResult(
        shared=split.shared_state(model),
        metrics={
            NUM_EXAMPLES: report.examples,
            "train-loss": summary["final_loss"],
            "train-l-n": summary["final_l_n"],
            "train-l-p": summary["final_l_p"],
            "train-steps": report.steps,
            "train-seconds": report.seconds,
        },
    )
