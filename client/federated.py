"""A device's part in a federated run, as plain functions (the ClientApp is a skin over them).

The base model stays resident in the process (loaded once, however many virtual clients
or rounds it serves); per round the user's adapters are rebuilt on it from the shared
parameters received and the personal parameters on the device's disk, trained locally,
and only the shared part leaves, with allow-listed numeric metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from client.device import Device, Expert
from client.evaluation import donor_history, evaluate_user, public_donor_history
from client.node_store import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, USER_DIR_KEY, simulation_donors, user_store
from client.personal_state import load_personal_state, save_personal_state
from client.token_weights import user_weight_scheme
from client.trainer import train_adapter
from shared.config import GenerationSettings, TrainConfig
from shared.expert_package import ExpertDigestError, cached_expert
from shared.methods import METHODS
from shared.metrics import SCORE_KEYS, SCORES
from shared.paths import atomic_write_json
from shared.run_config import RunConfig
from shared.split import EXPERT_SPLIT, SplitSpec
from shared.user_store import UserStore
from shared.wire import NUM_EXAMPLES, Phase, RoundInstruction

log = logging.getLogger(__name__)


# The process's resident device: a base model is loaded once and serves every virtual
# client and round that this worker runs.
_resident: dict[tuple, Device] = {}


def resident_device(config: RunConfig) -> Device:
    """The device for `config`'s base, LoRA shape and prompt; loaded on first use only."""
    key = (config.base, config.lora, config.prompt)
    if key not in _resident:
        _resident.clear()  # one base at a time: a new run with another base replaces it
        started = time.perf_counter()
        _resident[key] = Device.load(config.base, config.lora, config.prompt)
        log.info("base %s resident after %.1f s", config.base.model, time.perf_counter() - started)
    return _resident[key]


def forget_resident_device() -> None:
    """Drop the resident base: after a failure that may have left its adapters half built (a
    corrupt expert, a bug), the next message loads a clean one."""
    _resident.clear()


@dataclass(frozen=True)
class RoundResult:
    shared: dict[str, torch.Tensor]
    metrics: dict[str, float]


def phase_setup(config: RunConfig, instruction: RoundInstruction) -> tuple[SplitSpec, TrainConfig]:
    """The split and local training of a phase: the expert is a plain FedAvg ContextSFT LoRA."""
    seed = config.federation.seed + instruction.server_round
    if instruction.phase == Phase.EXPERT:
        return EXPERT_SPLIT, config.train_config("context-sft", seed)
    return config.sharing.spec, config.train_config(config.train.method, seed)


def device_expert(instruction: RoundInstruction, train_config: TrainConfig) -> Expert | None:
    """The cached expert a round's token weights need (never a file that fails its digest)."""
    if not train_config.needs_expert:
        return None
    if not instruction.expert_digest:
        raise ValueError(f"method {train_config.method!r} needs an expert, but the round names none")
    path = cached_expert(instruction.expert_digest)
    if path is None:
        raise ExpertDigestError(f"expert {instruction.expert_digest[:16]}... is not cached on this device")
    return Expert(path, instruction.expert_digest)


def build_adapters(
    device: Device, store: UserStore, split: SplitSpec, shared_in: dict[str, torch.Tensor], run_name: str, seed: int
) -> PeftModel:
    """The user's adapters on the resident base: shared part as received, personal part from
    the store (freshly initialised before the user's first round)."""
    model = device.host.new(*split.adapters, seed=seed)
    personal = load_personal_state(store, run_name)
    if personal is not None:
        split.load_personal(model, personal)
    split.load_shared(model, shared_in)
    return model


def train_round(
    device: Device,
    store: UserStore,
    split: SplitSpec,
    shared_in: dict[str, torch.Tensor],
    config: TrainConfig,
    run_name: str,
    expert: Expert | None = None,
    started: float | None = None,
    donors: Sequence[UserStore] = (),
) -> RoundResult:
    """Train the user's adapters for one round; the personal part is saved in the store,
    the shared part and allow-listed numeric metrics are returned. `setup-seconds` counts
    from `started` (default: now) to the first step: the base (when not yet resident),
    encoding, adapters; `weights-seconds` the expert's token weights and generic texts (computed
    when not yet cached for this expert). `donors`: other users' stores, for the counterfactual
    history 'donors' (simulation only)."""
    started = time.perf_counter() if started is None else started
    weights_started = time.perf_counter()
    # The expert's token probabilities and generic texts: computed once per expert digest, then
    # read from the store's cache.
    examples = device.store_examples(store, config, expert, donors)
    config = dataclasses.replace(config, weight_scheme=user_weight_scheme(
        config.weight_scheme, [e.expert_probs for e in examples if e.expert_probs is not None]))
    weights_seconds = time.perf_counter() - weights_started if config.needs_expert else 0.0
    model = build_adapters(device, store, split, shared_in, run_name, config.seed)
    setup_seconds = time.perf_counter() - started - weights_seconds
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
            "setup-seconds": setup_seconds,
            "weights-seconds": weights_seconds,
        },
    )


def evaluate_personalized(
    device: Device,
    store: UserStore,
    split: SplitSpec,
    shared_in: dict[str, torch.Tensor],
    method: str,
    run_name: str,
    seed: int,
    evaluate_base: bool = False,
    generation: GenerationSettings | None = None,
    other_history: Sequence[str] | None = None,
) -> dict[str, float]:
    """Evaluate the user's personalized model (global shared + own personal part) on the
    store's held-out samples, and with `evaluate_base` the base alone on the same samples and
    prompts (and, where the method reads the history, without it); numeric metrics only.
    History sensitivity reads `other_history` (in a simulation,
    another user's of the same dataset), else a public donor history: a deployed device holds
    no other user's history. The generated texts stay on the device, in the store
    (`evaluation_path`), for its user to read."""
    model = build_adapters(device, store, split, shared_in, run_name, seed)
    device.host.activate(*split.adapters)
    uses_history = METHODS[method].uses_history
    other = list(other_history) if other_history else list(public_donor_history())
    outputs = {}

    def scores(prefix: str, history: bool = uses_history) -> dict[str, float]:
        row = evaluate_user(model, device.tokenizer, store, history, device.prompt, other, generation)
        outputs[prefix] = row["examples"]
        return {f"{prefix}-{key}": row[score] for score, key in zip(SCORES, SCORE_KEYS, strict=True)}

    metrics = {NUM_EXAMPLES: len(store.samples("test")), **scores("eval")}
    if evaluate_base:
        with model.disable_adapter():
            metrics |= scores("eval-base")
            if uses_history:
                metrics |= scores("eval-base-no-history", history=False)
    atomic_write_json(evaluation_path(store, run_name), {"run": run_name, "method": method, "outputs": outputs})
    return metrics


def evaluation_path(store: UserStore, run_name: str) -> Path:
    """Where a device keeps the texts its latest evaluation in run `run_name` generated."""
    return store.cache_dir / "evaluations" / f"{run_name}.json"


def handle_train(
    instruction: RoundInstruction, shared_in: dict[str, torch.Tensor], node_config: Mapping[str, Any],
    config: RunConfig,
) -> RoundResult:
    started = time.perf_counter()
    split, train_config = phase_setup(config, instruction)
    device = resident_device(config)
    store = user_store(node_config, config)
    expert = device_expert(instruction, train_config)
    uses_donors = "donors" in (train_config.weight_scheme.dce_reference, train_config.mce_reference)
    donors = simulation_donors(node_config, config) if uses_donors else ()
    return train_round(device, store, split, shared_in, train_config, instruction.run_name, expert,
                       started=started, donors=donors)


def handle_evaluate(
    instruction: RoundInstruction, shared_in: dict[str, torch.Tensor], node_config: Mapping[str, Any],
    config: RunConfig,
) -> dict[str, float]:
    if instruction.phase != Phase.PERSONALIZE:
        raise ValueError(f"evaluation is of the personalized model, not of phase {instruction.phase!r}")
    store = user_store(node_config, config)
    # In a simulation, history sensitivity reads another user of the same dataset.
    simulated = (PARTITION_ID_KEY in node_config and USER_DIR_KEY not in node_config
                 and int(node_config.get(NUM_PARTITIONS_KEY, 1)) > 1)
    other = donor_history(simulation_donors(node_config, config)[0]) if simulated else None
    return evaluate_personalized(resident_device(config), store, config.sharing.spec, shared_in, config.train.method,
                                 instruction.run_name, config.federation.seed, config.evaluate.base,
                                 other_history=other)

