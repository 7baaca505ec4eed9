"""The local trainer: one LoRA, one loop, and a step that reads like the NextQuill objective:

    passes  = forward(batch)                      the logits (or final hidden states) at the responses
    ω       = token_weights(passes, labels, p_E)   uniform, the expert's DCE, or the model's own
    L       = loss(passes, labels, ω)              L_n + alpha · L_p
    L.backward()

Which forward (one pass; two passes, separate, paired or lean), which token weights and which
loss (on logits; or, with `fused_loss`, on the final hidden states with the LM head applied a
chunk at a time) a run uses follows from its method's row in `shared/methods.py` and its
settings; `choose_step` picks them once per training run, not per step. With `compile_layers`,
the decoder layers run through torch.compile for the duration of the training loop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from tqdm.auto import tqdm

from client.token_weights import TokenProbs
from shared.batching import PairBatch, collate
from shared.config import TrainConfig, WeightScheme
from shared.forward import (
    compiled_decoder_layers,
    compute_autocast,
    lm_head_weight,
    model_device,
    paired_response_logits,
    response_hidden,
    response_logits,
    supports_paired_pass,
)
from shared.losses import fused_nextquill_loss, nextquill_loss, token_probabilities, token_weights
from shared.methods import Method
from shared.prompts import EncodedSample

log = logging.getLogger(__name__)


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


@dataclass
class Passes:
    """A step's forward passes at the N = B·R response positions of the prompt the method
    reads, and of the no-history prompt when the step needs them (for L_p or the model's own
    DCE): float32 logits [N, V]; or, read with `_hidden_states` for the fused loss, the final
    hidden states [N, D] that the LM head maps to them. `finish` runs after the backward (the
    lean passes' second stage)."""

    outputs: torch.Tensor
    outputs_without: torch.Tensor | None = None
    finish: Callable[[], None] = lambda: None


Forward = Callable[[torch.nn.Module, PairBatch], Passes]
Read = Callable[[torch.nn.Module, PairBatch, bool], torch.Tensor]
ExpertProbs = tuple[torch.Tensor, torch.Tensor]  # the expert's p(y_t | x, h, y<t), p(y_t | x, ∅, y<t): [B, R] each
TokenWeights = Callable[[Passes, torch.Tensor, ExpertProbs | None], torch.Tensor]
Loss = Callable[[Passes, torch.Tensor, torch.Tensor, float, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _logits(model: torch.nn.Module, batch: PairBatch, with_history: bool) -> torch.Tensor:
    side = batch.with_history if with_history else batch.without_history
    return response_logits(model, side, batch.response_length).flatten(0, 1)


def _hidden_states(model: torch.nn.Module, batch: PairBatch, with_history: bool) -> torch.Tensor:
    side = batch.with_history if with_history else batch.without_history
    return response_hidden(model, side, batch.response_length).flatten(0, 1)


def history_pass(model: torch.nn.Module, batch: PairBatch, read: Read = _logits) -> Passes:
    """ContextSFT, DCE-only: the prompt with the history."""
    return Passes(read(model, batch, True))


def no_history_pass(model: torch.nn.Module, batch: PairBatch, read: Read = _logits) -> Passes:
    """SFT: the prompt without the history."""
    return Passes(read(model, batch, False))


def history_dropout_pass(rate: float, seed: int) -> Forward:
    """ContextSFT with the history removed from the prompt in a `rate` fraction of the steps
    (drawn per step, seeded): an expert trained so keeps p(y | x, ∅) a model of what all users'
    targets share, and DCE measures what this user's history adds to it."""
    rng = random.Random(f"history-dropout-{seed}")  # not the sample order's sequence

    def forward(model: torch.nn.Module, batch: PairBatch) -> Passes:
        return Passes(_logits(model, batch, with_history=rng.random() >= rate))

    return forward


def two_passes(model: torch.nn.Module, batch: PairBatch, read: Read = _logits) -> Passes:
    """NextQuill: (x, h, y) and (x, ∅, y), two forwards, both in the graph."""
    return Passes(read(model, batch, True), read(model, batch, False))


def paired_passes(model: torch.nn.Module, batch: PairBatch) -> Passes:
    """NextQuill's two passes as one forward (block-diagonal mask); the same gradients."""
    with_history, without = paired_response_logits(model, batch)
    return Passes(with_history.flatten(0, 1), without.flatten(0, 1))


def lean_two_passes(model: torch.nn.Module, batch: PairBatch) -> Passes:
    """The two passes without holding both graphs at once: the no-history logits come without
    a graph, as a leaf that collects its gradient during the backward through the history
    pass; `finish` then runs the short no-history pass again and back-propagates that
    gradient. The same gradients (the passes are deterministic: no dropout); the peak memory
    is the longer pass's alone, for one more short forward."""
    with torch.no_grad():
        without = _logits(model, batch, with_history=False)
    without.requires_grad_()

    def finish() -> None:
        if without.grad is not None:  # None when the loss did not use the pass (alpha = 0)
            _logits(model, batch, with_history=False).backward(without.grad)

    return Passes(_logits(model, batch, with_history=True), without, finish)


def choose_forward(config: TrainConfig, model: torch.nn.Module) -> Forward:
    """The passes `config.method` needs, in the variant the settings ask for."""
    method = config.spec
    if config.fused_loss:  # the settings refuse it beside a paired, lean or dropout variant
        forward = two_passes if method.aligns_effects else history_pass if method.uses_history else no_history_pass
        return partial(forward, read=_hidden_states)
    if not method.uses_history:
        return no_history_pass
    if not method.aligns_effects:
        return history_dropout_pass(config.history_dropout, config.seed) if config.history_dropout else history_pass
    if config.lean_memory:
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
            raise ValueError("lean_memory recomputes the no-history pass and needs it deterministic: set dropout to 0")
        return lean_two_passes
    if config.paired_pass:
        if supports_paired_pass(model):
            return paired_passes
        log.warning("paired_pass asked for, but attention implementation %r takes no 4D mask: "
                    "running the two passes separately", getattr(model.config, "_attn_implementation", None))
    return two_passes


def uniform_weights(passes: Passes, labels: torch.Tensor, expert: ExpertProbs | None) -> torch.Tensor:
    """ω = 1: SFT, ContextSFT, MCE-only."""
    return torch.ones_like(labels, dtype=torch.float32)


def expert_weights(scheme: WeightScheme) -> TokenWeights:
    """ω from the expert's DCE (the paper), computed on the device before training."""

    def weights(passes: Passes, labels: torch.Tensor, expert: ExpertProbs | None) -> torch.Tensor:
        prob_with, prob_without = expert
        return token_weights(scheme, prob_with.flatten(), prob_without.flatten())

    return weights


def self_weights(scheme: WeightScheme) -> TokenWeights:
    """ω from the DCE of the model being trained (the authors' released code), no gradient."""

    def weights(passes: Passes, labels: torch.Tensor, expert: ExpertProbs | None) -> torch.Tensor:
        return token_weights(scheme, token_probabilities(passes.outputs.detach(), labels),
                             token_probabilities(passes.outputs_without.detach(), labels))

    return weights


def choose_token_weights(method: Method, scheme: WeightScheme) -> TokenWeights:
    """Where `method`'s row says ω comes from."""
    if method.weights == "expert":
        return expert_weights(scheme)
    if method.weights == "self":
        return self_weights(scheme)
    return uniform_weights


def logits_loss(passes: Passes, labels: torch.Tensor, weights: torch.Tensor, alpha: float,
                weighted_alignment: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The NextQuill loss of the passes' logits."""
    return nextquill_loss(passes.outputs, passes.outputs_without if alpha else None, labels, weights, alpha,
                          weighted_alignment=weighted_alignment)


def head_folded_loss(model: torch.nn.Module) -> Loss:
    """The NextQuill loss of the passes' final hidden states, `model`'s LM head applied a chunk
    of tokens at a time (`fused_loss`), in the model's own precision (bf16 autocast on CUDA):
    the same loss and gradients, without every token's logits of both passes in memory."""
    head = lm_head_weight(model)
    if head is None:
        raise ValueError("fused_loss needs a linear LM head without bias or logit soft-capping, which this base "
                         "does not have: train without it")

    def loss(passes: Passes, labels: torch.Tensor, weights: torch.Tensor, alpha: float,
             weighted_alignment: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with compute_autocast(model):
            return fused_nextquill_loss(passes.outputs, passes.outputs_without if alpha else None, head, labels,
                                        weights, alpha, weighted_alignment=weighted_alignment)

    return loss


def choose_loss(config: TrainConfig, model: torch.nn.Module) -> Loss:
    return head_folded_loss(model) if config.fused_loss else logits_loss


@dataclass(frozen=True)
class TrainingStep:
    """One step's gradients: forward passes, token weights, the NextQuill loss, backward."""

    model: torch.nn.Module
    forward: Forward
    token_weights: TokenWeights
    loss: Loss
    alpha: float  # 0 for a method that does not align effects
    weighted_alignment: bool

    def __call__(self, batch: PairBatch, expert: ExpertProbs | None = None) -> tuple[torch.Tensor, ...]:
        """Accumulate the gradients of one batch; returns (total, l_n, l_p), detached."""
        passes = self.forward(self.model, batch)
        labels = batch.labels.flatten()
        weights = self.token_weights(passes, labels, expert).to(labels.device)
        total, l_n, l_p = self.loss(passes, labels, weights, self.alpha, self.weighted_alignment)
        total.backward()
        passes.finish()
        return total.detach(), l_n.detach(), l_p.detach()


def choose_step(config: TrainConfig, model: torch.nn.Module) -> TrainingStep:
    """The step of `config.method` on `model`, chosen once per training run."""
    method = config.spec
    return TrainingStep(model, choose_forward(config, model), choose_token_weights(method, config.weight_scheme),
                        choose_loss(config, model), config.alpha if method.aligns_effects else 0.0,
                        method.weighted_alignment)


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
    if config.spec.needs_expert and any(e.expert_probs is None for e in examples):
        raise ValueError(f"method {config.method!r} needs the expert's token probabilities for every example")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: attach a LoRA first")
    step = choose_step(config, model)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    rng = random.Random(config.seed)

    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = config.max_steps or max(1, round(config.epochs * steps_per_epoch))
    report = TrainReport()
    model.train()
    device = model_device(model)
    # Compiled while training only: the layers run eagerly again for evaluation and generation.
    with compiled_decoder_layers(model) if config.compile_layers else contextlib.nullcontext():
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
            if config.spec.needs_expert:
                width = batch.response_length
                expert = (
                    right_aligned([e.expert_probs.prob_with for e in chunk], width).to(device),
                    right_aligned([e.expert_probs.prob_without for e in chunk], width).to(device),
                )
            total, l_n, l_p = step(batch, expert)
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
