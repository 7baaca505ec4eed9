"""The local trainer: one LoRA, one loop, five methods that differ only in which prompt they
read, whether the no-history pass is aligned (L_p), and where token weights come from (the
table is in `shared/methods.py`)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from client.token_weights import TokenProbs
from shared.batching import PairBatch, collate
from shared.losses import WeightScheme, nextquill_loss, token_probabilities
from shared.methods import METHODS, Method
from shared.modeling import model_device, paired_response_logits, response_logits, supports_paired_pass
from shared.prompts import EncodedSample
from shared.settings import check_settings, setting

log = logging.getLogger(__name__)


WEIGHT_SOURCES = ("expert", "self")


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings."""

    method: str = setting("nextquill", f"one of {sorted(METHODS)}", choices=tuple(METHODS))
    epochs: float = setting(2.0, "passes over the training samples", above=0.0)
    max_steps: int | None = setting(None, "stop after this many steps (overrides epochs)", minimum=1)
    batch_size: int = setting(8, "samples per step", minimum=1)
    learning_rate: float = setting(3e-4, "AdamW learning rate of the LoRA", above=0.0)
    alpha: float = setting(0.1, "weight of the causal preference alignment loss L_p", minimum=0.0)
    weights: WeightScheme = setting(default_factory=WeightScheme, help="DCE -> ω")
    weight_source: str = setting(
        "expert", "'expert' (the paper) or 'self': DCE from the model being trained (authors' code)",
        choices=WEIGHT_SOURCES,
    )
    weighted_alignment: bool = setting(True, "weight L_p by ω (the paper); False = unweighted L_p (authors' code)")
    paired_pass: bool = setting(
        False, "NextQuill's with- and no-history passes as one forward (block-diagonal mask) instead of two; same "
               "gradients; not faster on the CPU, not yet measured on a GPU",
    )
    lean_memory: bool = setting(
        False, "two-stage backward: the peak memory of the longer pass alone, for one more short forward"
    )
    seed: int = setting(0, "seed of the sample order")

    def __post_init__(self) -> None:
        check_settings(self)

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def needs_expert(self) -> bool:
        return self.spec.expert_weights and self.weight_source == "expert"


@dataclass(frozen=True)
class TrainExample:
    encoded: EncodedSample
    expert_probs: TokenProbs | None = None


@dataclass
class TrainReport:
    steps: int = 0
    examples: int = 0
    seconds: float = 0.0
    loss: list[float] = field(default_factory=list)
    l_n: list[float] = field(default_factory=list)
    l_p: list[float] = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(1, self.steps)

    def summary(self) -> dict[str, float]:
        tail = max(1, min(10, len(self.loss)))
        return {
            "steps": self.steps,
            "examples": self.examples,
            "seconds": self.seconds,
            "seconds_per_step": self.seconds_per_step,
            "final_loss": sum(self.loss[-tail:]) / tail if self.loss else float("nan"),
            "final_l_n": sum(self.l_n[-tail:]) / tail if self.l_n else float("nan"),
            "final_l_p": sum(self.l_p[-tail:]) / tail if self.l_p else float("nan"),
        }


def right_aligned(values: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    """[B, width] float tensor holding each row's values at its end (zeros before)."""
    out = torch.zeros((len(values), width), dtype=torch.float32)
    for row, vals in enumerate(values):
        if vals:
            out[row, width - len(vals) :] = torch.tensor(vals, dtype=torch.float32)
    return out


def step_loss(
    model: torch.nn.Module,
    batch: PairBatch,
    config: TrainConfig,
    expert_probs: tuple[torch.Tensor, torch.Tensor] | None,
    logits_without: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One NextQuill step's loss: (total, l_n, l_p). expert_probs: ([B, R], [B, R]) or None.
    `logits_without` [B·R, V]: the no-history pass when the caller has run it already."""
    method = config.spec
    length = batch.response_length
    labels = batch.labels.flatten()

    self_weights = method.expert_weights and config.weight_source == "self"
    if (logits_without is None and method.aligns_effects and method.uses_history and config.paired_pass
            and supports_paired_pass(model)):
        logits, logits_without = (t.flatten(0, 1) for t in paired_response_logits(model, batch))
    else:
        side = batch.with_history if method.uses_history else batch.without_history
        logits = response_logits(model, side, length).flatten(0, 1)
    if logits_without is None and method.aligns_effects:
        logits_without = response_logits(model, batch.without_history, length).flatten(0, 1)
    elif logits_without is None and self_weights:
        with torch.no_grad():
            logits_without = response_logits(model, batch.without_history, length).flatten(0, 1)

    if not method.expert_weights:
        weights = torch.ones_like(labels, dtype=torch.float32)
    elif self_weights:
        weights = config.weights.weights(
            token_probabilities(logits.detach(), labels), token_probabilities(logits_without.detach(), labels)
        )
    else:
        prob_with, prob_without = expert_probs
        weights = config.weights.weights(prob_with.flatten(), prob_without.flatten())

    alpha = config.alpha if method.aligns_effects else 0.0
    return nextquill_loss(
        logits, logits_without if alpha else None, labels, weights.to(logits.device), alpha,
        weighted_alignment=config.weighted_alignment,
    )


def step_backward(
    model: torch.nn.Module,
    batch: PairBatch,
    config: TrainConfig,
    expert_probs: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accumulate one step's gradients; returns (total, l_n, l_p), detached.

    With `config.lean_memory` and a method that aligns effects, the two passes never hold
    their activations at the same time: the no-history logits are computed without a graph,
    the loss is back-propagated through the history pass (giving, on the side, its gradient
    with respect to those logits), then the short no-history pass runs again and takes that
    gradient. The gradients are the same (the passes are deterministic: no dropout); the peak
    memory is the longer pass's alone, for one more short forward pass."""
    if not (config.lean_memory and config.spec.aligns_effects):
        total, l_n, l_p = step_loss(model, batch, config, expert_probs)
        total.backward()
        return total.detach(), l_n.detach(), l_p.detach()
    length = batch.response_length
    with torch.no_grad():
        without = response_logits(model, batch.without_history, length).flatten(0, 1)
    without.requires_grad_()
    total, l_n, l_p = step_loss(model, batch, config, expert_probs, logits_without=without)
    total.backward()
    response_logits(model, batch.without_history, length).flatten(0, 1).backward(without.grad)
    return total.detach(), l_n.detach(), l_p.detach()


def train_adapter(
    model: torch.nn.Module,
    examples: Sequence[TrainExample],
    pad_id: int,
    config: TrainConfig,
    progress: bool = True,
) -> TrainReport:
    """Train the active (trainable) adapter of `model` on `examples` with `config.method`."""
    if not examples:
        raise ValueError("no training examples: the user store has no training samples")
    if config.needs_expert and any(e.expert_probs is None for e in examples):
        raise ValueError(f"method {config.method!r} needs the expert's token probabilities for every example")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: attach a LoRA first")
    if config.lean_memory and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        raise ValueError("lean_memory recomputes the no-history pass and needs it deterministic: set dropout to 0")
    if config.paired_pass and config.spec.aligns_effects and not supports_paired_pass(model):
        log.warning("paired_pass asked for, but attention implementation %r takes no 4D mask: "
                    "running the two passes separately", getattr(model.config, "_attn_implementation", None))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    device = model_device(model)
    rng = random.Random(config.seed)

    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = config.max_steps or max(1, round(config.epochs * steps_per_epoch))
    report = TrainReport()
    model.train()
    order: list[int] = []
    bar = tqdm(range(total_steps), desc=f"train {config.method}", disable=not progress, leave=False, mininterval=2)
    for _ in bar:
        if len(order) < config.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        chunk = [examples[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        started = time.perf_counter()
        batch = collate([e.encoded for e in chunk], pad_id).to(device)
        expert = None
        if config.needs_expert:
            width = batch.response_length
            expert = (
                right_aligned([e.expert_probs.prob_with for e in chunk], width).to(device),
                right_aligned([e.expert_probs.prob_without for e in chunk], width).to(device),
            )
        total, l_n, l_p = step_backward(model, batch, config, expert)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report.seconds += time.perf_counter() - started
        report.steps += 1
        report.examples += len(chunk)
        report.loss.append(total.item())
        report.l_n.append(l_n.item())
        report.l_p.append(l_p.item())
        bar.set_postfix(loss=f"{report.loss[-1]:.3f}", refresh=False)
    model.eval()
    return report
