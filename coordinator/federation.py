"""The coordinator's run, as plain functions over a Flower `Grid` (the ServerApp is a skin).

Phases, each resumable from the checkpoint written after every round:
  1. expert       federated ContextSFT of an expert LoRA (FedAvg of all of it); then frozen
                  and published in the run directory with its content digest. Skipped when
                  the run config names an expert adapter, or the method needs none.
  2. distribution each device is asked whether it holds the expert (by digest); those that
                  do not receive its files, verify them and cache them.
  3. personalize  rounds of the method on the shared / personal split: the coordinator sends
                  and aggregates only the shared parameters (with `secagg.enabled`, every
                  training round, the expert's too, through SecAgg+: only their sum is seen).
  4. evaluate     every device evaluates its personalized model; metrics only come back.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coordinator.global_adapters import GlobalAdapters
from coordinator.nodes import NodeSnapshot, NodeWaiter
from coordinator.privacy import RunPrivacy, weight_key
from coordinator.run_directory import RoundLog, check_run_config, plot_rounds, read_summary, write_evaluation
from coordinator.secure_aggregation import secure_round
from coordinator.strategy import RoundOutcome, SampledFedAvg, ScreenedReplies
from shared.adapter_files import adapter_digest
from shared.adapters import check_adapter_base
from shared.expert_package import pack_expert
from shared.run_config import RunConfig
from shared.split import EXPERT_SPLIT, SplitSpec
from shared.wire import (
    EXPERT_DELIVER,
    EXPERT_RECORD,
    EXPERT_STATUS,
    HAS_EXPERT,
    QUERY_METRICS,
    Phase,
    RoundInstruction,
    SharedLayout,
    disallowed_metrics,
)

# A child of Flower's logger, so that progress shows where Flower's own does (`flwr run --stream`).
log = logging.getLogger("flwr.nextquill")

EXPERT_DIR = "expert"
SHARED_ADAPTER_DIR = "shared_adapter"


class RunFailed(ValueError):
    """Every device failed a round, or no device returned its evaluation: the run stops where
    its checkpoint stands (never at phase done), and a rerun after the cause is fixed goes on
    from there."""


def _failed(what: str, replies: list[Message], min_replies: int) -> RunFailed:
    reasons: dict[str, int] = {}
    for reply in replies:
        if reply.has_error():
            reasons[reply.error.reason] = reasons.get(reply.error.reason, 0) + 1
    causes = "".join(f"; {count} x {reason}" for reason, count in sorted(reasons.items()))
    succeeded = len(replies) - sum(reasons.values())
    return RunFailed(f"{what}: {succeeded} of {len(replies)} devices replied without an error, fewer than "
                     f"federation.min-replies ({min_replies}){causes}; the run stops here, not marked finished: "
                     "fix the cause (the devices' logs name it) and rerun to go on from here")


@dataclass
class RunResult:
    run_dir: Path
    expert_digest: str | None
    shared: dict[str, torch.Tensor]
    summary: dict[str, Any] | None


def run_federation(grid: Grid, config: RunConfig) -> RunResult:
    """Run (or resume) the phases of `config` in its run directory."""
    return FederatedRun(grid, config).run()


class FederatedRun:
    """One run of the coordinator. It owns the grid and the nodes it waits for, the run directory
    with its checkpoint and round log, the global adapters and the privacy accountant; its
    methods are the story of a run: train the expert, personalize, evaluate."""

    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self.grid, self.config = grid, config
        self.run_dir = config.resolve(config.federation.run_dir)
        self.adapters = GlobalAdapters(config.base.model, config.lora)
        if config.needs_expert and config.expert.adapter:  # before anything is written
            check_adapter_base(config.resolve(config.expert.adapter), self.adapters.base_id)
        check_run_config(self.run_dir, config.to_flower(), RunConfig().to_flower())
        self.rounds = RoundLog(self.run_dir)
        resumed = load_checkpoint(self.run_dir)
        if resumed is not None:
            log.info("resuming %s at phase %s after round %d", self.run_dir, resumed.phase, resumed.round)
        self.checkpoint = resumed or self._first_checkpoint()
        self.rounds.keep_until(self.checkpoint.phase, self.checkpoint.round)
        self.privacy = RunPrivacy.start(config.dp, config.releases, self.checkpoint.privacy)
        if config.dp.enabled:
            log.info("%s", self.privacy.describe())
        self.nodes = NodeWaiter(grid, config.federation.connect_timeout)
        self.expert_holders: set[int] = set()  # devices known to hold the expert

    def _first_checkpoint(self) -> Checkpoint:
        config = self.config
        if config.expert_phase:
            return Checkpoint(Phase.EXPERT, 0, uuid.uuid4().hex[:12])
        digest = adapter_digest(config.resolve(config.expert.adapter)) if config.needs_expert else None
        return Checkpoint(Phase.PERSONALIZE, 0, uuid.uuid4().hex[:12], digest)

    def run(self) -> RunResult:
        summary = read_summary(self.run_dir) if self.checkpoint.phase == Phase.DONE else None  # a finished run
        if self.checkpoint.phase == Phase.EXPERT:
            self.train_expert()
        if self.checkpoint.phase == Phase.PERSONALIZE:
            self.personalize()
        if self.checkpoint.phase == Phase.EVALUATE:
            summary = self.evaluate(final=True)
            self._advance(Phase.DONE)
        plot_rounds(self.run_dir, self.rounds.rows)
        log.info("run finished: %s", self.run_dir)
        return RunResult(self.run_dir, self.checkpoint.expert_digest, self.checkpoint.shared, summary)

    def train_expert(self) -> None:
        """Federated ContextSFT of one LoRA, then frozen and published with its digest."""
        shared = self._train_phase(EXPERT_SPLIT, self.config.expert.rounds)
        digest = self.adapters.save(EXPERT_SPLIT, shared, self.run_dir / EXPERT_DIR,
                                    {"run_id": self.checkpoint.run_id, "rounds": self.config.expert.rounds})
        log.info("expert published: %s (digest %s)", self.run_dir / EXPERT_DIR, digest[:16])
        self._advance(Phase.PERSONALIZE, expert_digest=digest, shared={})

    def personalize(self) -> None:
        """The method's rounds on the shared / personal split."""
        split = self.config.sharing.spec
        shared = self._train_phase(split, self.config.federation.rounds)
        self._advance(Phase.EVALUATE, shared=shared)
        if split.shares_whole_adapter:
            self.adapters.save(split, shared, self.run_dir / SHARED_ADAPTER_DIR, {"run_id": self.checkpoint.run_id})

    def _advance(self, phase: Phase, **changes: Any) -> None:
        self.checkpoint = replace(self.checkpoint, phase=phase, round=0, privacy=self.privacy.state(), **changes)
        save_checkpoint(self.run_dir, self.checkpoint)

    def _train_phase(self, split: SplitSpec, num_rounds: int) -> dict[str, torch.Tensor]:
        """The training rounds of the checkpoint's phase, from the one after the last completed;
        returns the phase's final shared parameters."""
        config, phase = self.config, self.checkpoint.phase
        shared = self.checkpoint.shared or self.adapters.initial_shared(split, config.federation.seed)
        for server_round in range(self.checkpoint.round + 1, num_rounds + 1):
            started = time.perf_counter()
            connected = self.nodes.nodes(config.federation.clients_per_round, config.federation.min_replies)
            if phase == Phase.PERSONALIZE and config.needs_expert:
                self.send_expert(connected)
            outcome = self.train_round(server_round, shared, connected)
            if outcome.shared is not None:
                shared = outcome.shared
            self._record(server_round, num_rounds, outcome, time.perf_counter() - started)
            self.checkpoint = replace(self.checkpoint, round=server_round, shared=shared,
                                      privacy=self.privacy.state())
            save_checkpoint(self.run_dir, self.checkpoint)
            if phase == Phase.PERSONALIZE and config.evaluate.every and server_round % config.evaluate.every == 0 \
                    and server_round < num_rounds:
                self.evaluate(final=False)
        return shared

    def send_expert(self, connected: list[int]) -> None:
        """The expert to the connected devices not yet known to hold it (once per device)."""
        self.expert_holders |= distribute_expert(
            self.grid, expert_dir(self.config, self.run_dir), self.checkpoint.expert_digest,
            self.config.federation.round_timeout,
            [node for node in connected if node not in self.expert_holders])

    def train_round(self, server_round: int, shared: dict[str, torch.Tensor], connected: list[int]) -> RoundOutcome:
        """One training round over a sample of `connected`: plain FedAvg of the screened replies,
        or SecAgg+'s sum; either way the same outcome."""
        config, checkpoint = self.config, self.checkpoint
        instruction = RoundInstruction(checkpoint.phase, server_round, checkpoint.run_id,
                                       checkpoint.expert_digest or "")
        strategy = _strategy(config, self.privacy, len(connected))
        layout = SharedLayout.of(shared)
        arrays = layout.encode(shared, config.sharing.transport_dtype, config.sharing.pack)
        random.seed(f"{config.federation.seed}-{checkpoint.phase}-{server_round}")  # FedAvg samples with `random`
        messages = list(strategy.configure_train(server_round, arrays,
                                                 ConfigRecord({**instruction.to_config(), **layout.to_config()}),
                                                 NodeSnapshot(self.grid, connected)))
        if config.secagg.enabled:
            return secure_round(self.grid, config, server_round, shared, instruction.to_config(),
                                [message.metadata.dst_node_id for message in messages])
        received = list(self.grid.send_and_receive(messages, timeout=config.federation.round_timeout))
        if received and all(reply.has_error() for reply in received):
            raise _failed(f"{checkpoint.phase} round {server_round}", received, config.federation.min_replies)
        record, metrics = strategy.aggregate_train(server_round, received)
        return RoundOutcome(shared=layout.decode(record) if record is not None else None,
                            metrics=dict(metrics) if metrics else {}, sampled=len(messages), replies=len(received),
                            accepted=len(strategy.accepted), upload_bytes_per_client=arrays.count_bytes(),
                            update_norms=_norms(strategy.update_norms))

    def _record(self, server_round: int, num_rounds: int, outcome: RoundOutcome, seconds: float) -> None:
        aggregated = outcome.shared is not None
        row = {
            "phase": self.checkpoint.phase, "round": server_round, "sampled": outcome.sampled,
            "replies": outcome.replies, "accepted": outcome.accepted, "aggregated": aggregated,
            "upload_bytes_per_client": outcome.upload_bytes_per_client, "seconds": seconds, **outcome.metrics,
            **outcome.update_norms, **self.privacy.after_round(aggregated, sent=bool(outcome.replies)),
        }
        self.rounds.append(row)
        log.info("[%s %d/%d] %d sampled, %d replied, %d aggregated, train loss %s, %.1f s", row["phase"],
                 server_round, num_rounds, row["sampled"], row["replies"], row["accepted"],
                 f"{row['train-loss']:.4f}" if "train-loss" in row else "-", seconds)

    def evaluate(self, final: bool) -> dict[str, Any] | None:
        """Every connected device (or `evaluate.clients` of them) evaluates its personalized model;
        the final evaluation writes the per-user table and the macro-average."""
        config, checkpoint = self.config, self.checkpoint
        started = time.perf_counter()
        strategy = _strategy(config)
        server_round = checkpoint.round if not final else config.federation.rounds
        instruction = RoundInstruction(Phase.PERSONALIZE, server_round, checkpoint.run_id,
                                       checkpoint.expert_digest or "")
        connected = self.nodes.nodes(config.evaluate.clients or config.federation.clients_per_round,
                                     config.federation.min_replies)
        layout = SharedLayout.of(checkpoint.shared)
        messages = list(strategy.configure_evaluate(
            server_round, layout.encode(checkpoint.shared, config.sharing.transport_dtype, config.sharing.pack),
            ConfigRecord({**instruction.to_config(), **layout.to_config()}), NodeSnapshot(self.grid, connected)))
        replies = list(self.grid.send_and_receive(messages, timeout=config.federation.round_timeout))
        metrics = strategy.aggregate_evaluate(server_round, replies)
        users = [{"node_id": reply.metadata.src_node_id, **dict(next(iter(reply.content.metric_records.values())))}
                 for reply in strategy.accepted] if metrics is not None else []
        if final and not users:
            raise _failed(f"the evaluation after round {server_round}", replies, config.federation.min_replies)
        summary = write_evaluation(self.run_dir, users, {"privacy": self.privacy.summary()}) if final else None
        macro = summary["macro_average"] if summary else {}
        self.rounds.append({"phase": Phase.PERSONALIZE if not final else Phase.EVALUATE, "round": server_round,
                            "sampled": len(messages), "replies": len(replies), "accepted": len(users),
                            "seconds": time.perf_counter() - started, **(dict(metrics) if metrics else {}),
                            **{f"macro-{k}": v for k, v in macro.items()}})
        log.info("[evaluate after round %d] %d users: %s", server_round, len(users),
                 ", ".join(f"{k} {v:.4f}" for k, v in (dict(metrics) if metrics else {}).items()))
        if metrics:
            log.info("[evaluate after round %d] %s", server_round, side_by_side(dict(metrics)))
        return summary


def expert_dir(config: RunConfig, run_dir: Path) -> Path:
    return config.resolve(config.expert.adapter) if config.expert.adapter else run_dir / EXPERT_DIR


def _strategy(config: RunConfig, privacy: RunPrivacy | None = None, connected: int = 0) -> ScreenedReplies:
    """A round's strategy: FedAvg sampling `federation.clients-per-round` of the `connected` nodes, inside
    the run's DP wrapper when training with DP, behind the screening of replies."""
    if privacy is None:  # evaluation: FedAvg's mean of the metrics, by examples
        return ScreenedReplies(SampledFedAvg(clients_per_round=config.federation.clients_per_round,
                                             evaluate_clients=config.evaluate.clients),
                               min_replies=config.federation.min_replies)
    key = weight_key(config.dp)
    fedavg = SampledFedAvg(clients_per_round=config.federation.clients_per_round, weighted_by_key=key)
    sampled = min(config.federation.clients_per_round, connected)
    uniform = {key: config.federation.local_steps} if config.dp.central else {}
    population = max(config.federation.clients_per_round, connected)
    return ScreenedReplies(privacy.wrap(fedavg, sampled, population), min_replies=config.federation.min_replies,
                           expected_metrics=uniform, max_update_norm=config.federation.max_update_norm)


def _norms(norms: list[float]) -> dict[str, float]:
    """The spread of the updates' L2 norms as received (before any server-side clipping): what
    to set dp-clip by."""
    if not norms:
        return {}
    return {"update-norm-median": statistics.median(norms), "update-norm-max": max(norms)}


def side_by_side(metrics: dict[str, float]) -> str:
    """The personalized model beside the base reading the history and the base without it."""
    models = (("personalized", "eval-"), ("base with the method's prompt", "eval-base-"),
              ("base without history", "eval-base-no-history-"))
    parts = []
    for score in ("rouge1", "nll"):
        found = [f"{name} {metrics[prefix + score]:.4f}" for name, prefix in models if prefix + score in metrics]
        parts.append(f"{score}: " + ", ".join(found))
    return "; ".join(parts)


def distribute_expert(grid: Grid, expert: Path, digest: str, timeout: float, nodes: list[int]) -> set[int]:
    """Send the expert (files and digest) to those of `nodes` that lack it; returns the nodes
    that hold it now. A device verifies the digest before it caches the files."""
    if not nodes:
        return set()
    status = _query(grid, nodes, {"action": EXPERT_STATUS, "expert-digest": digest}, None, timeout)
    missing = [node for node, has in status.items() if not has]
    package = ConfigRecord(pack_expert(expert))
    if package["digest"] != digest:
        raise ValueError(f"expert {expert} has digest {package['digest'][:16]}..., the run expects {digest[:16]}...")
    delivered = _query(grid, missing, {"action": EXPERT_DELIVER}, package, timeout)
    log.info("expert %s...: %d of %d devices held it, %d received it", digest[:16], len(status) - len(missing),
             len(nodes), sum(delivered.values()))
    return {node for node, has in status.items() if has} | {node for node, ok in delivered.items() if ok}


def _query(grid: Grid, nodes: list[int], request: dict[str, Any], expert: ConfigRecord | None,
           timeout: float) -> dict[int, bool]:
    if not nodes:
        return {}
    content = {"config": ConfigRecord(request)} | ({EXPERT_RECORD: expert} if expert is not None else {})
    messages = [Message(content=RecordDict(content), message_type=MessageType.QUERY, dst_node_id=node)
                for node in nodes]
    answers: dict[int, bool] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d: expert %s failed: %s", node, request["action"], reply.error.reason)
            continue
        metrics = dict(next(iter(reply.content.metric_records.values()), {}))
        bad = disallowed_metrics(metrics, QUERY_METRICS)
        if bad or HAS_EXPERT not in metrics:
            log.warning("node %d: reply to %s excluded (metrics %s)", node, request["action"], sorted(metrics))
            continue
        answers[node] = bool(metrics[HAS_EXPERT])
    return answers
