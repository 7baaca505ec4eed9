"""The coordinator's run, as plain functions over a Flower `Grid` (the ServerApp is a skin).

Phases, each resumable from the checkpoint written after every round:
  1. expert       federated ContextSFT of an expert LoRA (FedAvg of all of it); then frozen
                  and published in the run directory with its content digest. Skipped when
                  the run config names an expert adapter, or the method needs none.
  2. distribution each device is asked whether it holds the expert (by digest); those that
                  do not receive its files, verify them and cache them.
  3. personalize  rounds of the method on the shared / personal split: the coordinator sends
                  and aggregates only the shared parameters (with `secure-aggregation`, every
                  training round, the expert's too, through SecAgg+: only their sum is seen).
  4. evaluate     every device evaluates its personalized model; metrics only come back.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coordinator.global_adapters import GlobalAdapters
from coordinator.nodes import NodeSnapshot, NodeWaiter
from coordinator.privacy import RunPrivacy, weight_key
from coordinator.report import RoundLog, check_run_config, plot_rounds, read_summary, write_evaluation
from coordinator.secure_aggregation import secure_round
from coordinator.strategy import SampledFedAvg, ScreenedReplies
from shared.adapter_files import adapter_digest
from shared.adapters import check_adapter_base
from shared.config import RunConfig
from shared.expert_package import pack_expert
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
                     f"min-replies ({min_replies}){causes}; the run stops here, not marked finished: fix the cause "
                     "(the devices' logs name it) and rerun to go on from here")


@dataclass
class RunResult:
    run_dir: Path
    expert_digest: str | None
    shared: dict[str, torch.Tensor]
    summary: dict[str, Any] | None


def run_federation(grid: Grid, config: RunConfig) -> RunResult:
    """Run (or resume) the phases of `config` in its run directory."""
    run_dir = config.resolve(config.run_dir)
    adapters = GlobalAdapters(config.model, config.lora)
    if config.needs_expert and config.expert:  # before anything is written
        check_adapter_base(config.resolve(config.expert), adapters.base_id)
    check_run_config(run_dir, config.to_flower(), RunConfig().to_flower())
    rounds = RoundLog(run_dir)
    expert_phase = config.needs_expert and not config.expert
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        checkpoint = Checkpoint(Phase.EXPERT if expert_phase else Phase.PERSONALIZE, 0, uuid.uuid4().hex[:12])
        if config.needs_expert and config.expert:
            checkpoint.expert_digest = adapter_digest(config.resolve(config.expert))
    else:
        log.info("resuming %s at phase %s after round %d", run_dir, checkpoint.phase, checkpoint.round)
    rounds.keep_until(checkpoint.phase, checkpoint.round)
    privacy = RunPrivacy.start(config.privacy, config.releases, checkpoint.privacy)
    if config.privacy.enabled:
        log.info("%s", privacy.describe())
    nodes = NodeWaiter(grid, config.connect_timeout)

    if checkpoint.phase == Phase.EXPERT:
        shared = _rounds(grid, nodes, config, checkpoint, rounds, adapters, EXPERT_SPLIT, config.expert_rounds,
                         run_dir, privacy)
        checkpoint.expert_digest = adapters.save(EXPERT_SPLIT, shared, run_dir / EXPERT_DIR,
                                                 {"run_id": checkpoint.run_id, "rounds": config.expert_rounds})
        log.info("expert published: %s (digest %s)", run_dir / EXPERT_DIR, checkpoint.expert_digest[:16])
        checkpoint = Checkpoint(Phase.PERSONALIZE, 0, checkpoint.run_id, checkpoint.expert_digest,
                                privacy=privacy.state())
        save_checkpoint(run_dir, checkpoint)

    # A run resumed after it finished reports its recorded evaluation.
    summary = read_summary(run_dir) if checkpoint.phase == Phase.DONE else None
    if checkpoint.phase == Phase.PERSONALIZE:
        shared = _rounds(grid, nodes, config, checkpoint, rounds, adapters, config.split_spec, config.rounds,
                         run_dir, privacy)
        checkpoint = Checkpoint(Phase.EVALUATE, 0, checkpoint.run_id, checkpoint.expert_digest, shared,
                                privacy=privacy.state())
        save_checkpoint(run_dir, checkpoint)
        if config.split_spec.shares_whole_adapter:
            adapters.save(config.split_spec, shared, run_dir / SHARED_ADAPTER_DIR, {"run_id": checkpoint.run_id})

    if checkpoint.phase == Phase.EVALUATE:
        summary = run_evaluation(grid, nodes, config, checkpoint, rounds, run_dir, final=True, privacy=privacy)
        checkpoint = Checkpoint(Phase.DONE, 0, checkpoint.run_id, checkpoint.expert_digest, checkpoint.shared,
                                privacy=privacy.state())
        save_checkpoint(run_dir, checkpoint)
    plot_rounds(run_dir, rounds.rows)
    log.info("run finished: %s", run_dir)
    return RunResult(run_dir, checkpoint.expert_digest, checkpoint.shared, summary)


def expert_dir(config: RunConfig, run_dir: Path) -> Path:
    return config.resolve(config.expert) if config.expert else run_dir / EXPERT_DIR


def _strategy(config: RunConfig, privacy: RunPrivacy | None = None, connected: int = 0) -> ScreenedReplies:
    """A round's strategy: FedAvg sampling `clients-per-round` of the `connected` nodes, inside
    the run's DP wrapper when training with DP, behind the screening of replies."""
    if privacy is None:  # evaluation: FedAvg's mean of the metrics, by examples
        return ScreenedReplies(SampledFedAvg(clients_per_round=config.clients_per_round,
                                             evaluate_clients=config.evaluate_clients), min_replies=config.min_replies)
    key = weight_key(config.privacy)
    fedavg = SampledFedAvg(clients_per_round=config.clients_per_round, weighted_by_key=key)
    sampled = min(config.clients_per_round, connected)
    uniform = {key: config.local_steps} if config.privacy.central else {}
    population = max(config.clients_per_round, connected)
    return ScreenedReplies(privacy.wrap(fedavg, sampled, population), min_replies=config.min_replies,
                           expected_metrics=uniform, max_update_norm=config.max_update_norm)


def _rounds(
    grid: Grid,
    nodes: NodeWaiter,
    config: RunConfig,
    checkpoint: Checkpoint,
    rounds: RoundLog,
    adapters: GlobalAdapters,
    split: SplitSpec,
    num_rounds: int,
    run_dir: Path,
    privacy: RunPrivacy,
) -> dict[str, torch.Tensor]:
    """The training rounds of the checkpoint's phase, from the one after the last completed;
    returns the phase's final shared parameters. Personalization rounds first send the expert
    to connected devices that lack it (once per device)."""
    phase = checkpoint.phase
    shared = checkpoint.shared or adapters.initial_shared(split, config.seed)
    expert_holders: set[int] = set()
    for server_round in range(checkpoint.round + 1, num_rounds + 1):
        started = time.perf_counter()
        connected = nodes.nodes(config.clients_per_round, config.min_replies)
        if phase == Phase.PERSONALIZE and config.needs_expert:
            expert_holders |= distribute_expert(grid, expert_dir(config, run_dir), checkpoint.expert_digest,
                                                config.round_timeout, [n for n in connected if n not in expert_holders])
        instruction = RoundInstruction(phase, server_round, checkpoint.run_id, checkpoint.expert_digest or "")
        strategy = _strategy(config, privacy, len(connected))
        layout = SharedLayout.of(shared)
        arrays = layout.encode(shared, config.transport_dtype, config.pack_shared)
        random.seed(f"{config.seed}-{phase}-{server_round}")  # FedAvg samples with `random`
        messages = list(strategy.configure_train(server_round, arrays,
                                                 ConfigRecord({**instruction.to_config(), **layout.to_config()}),
                                                 NodeSnapshot(grid, connected)))
        if config.secure_aggregation:
            outcome = secure_round(grid, config, server_round, shared, instruction.to_config(),
                                   [message.metadata.dst_node_id for message in messages])
            aggregated, metrics, norms = outcome.shared, outcome.metrics, {}
            replies = accepted = outcome.summed
            upload = outcome.upload_bytes_per_client
        else:
            received = list(grid.send_and_receive(messages, timeout=config.round_timeout))
            if received and all(reply.has_error() for reply in received):
                raise _failed(f"{phase} round {server_round}", received, config.min_replies)
            record, metrics = strategy.aggregate_train(server_round, received)
            aggregated = layout.decode(record) if record is not None else None
            replies, accepted, upload = len(received), len(strategy.accepted), arrays.count_bytes()
            norms = _norms(strategy.update_norms)
        if aggregated is not None:
            shared = aggregated
        row = {
            "phase": phase, "round": server_round, "sampled": len(messages), "replies": replies,
            "accepted": accepted, "aggregated": aggregated is not None, "upload_bytes_per_client": upload,
            "seconds": time.perf_counter() - started, **(dict(metrics) if metrics else {}),
            **norms, **privacy.after_round(aggregated is not None, sent=bool(replies)),
        }
        rounds.append(row)
        checkpoint.round, checkpoint.shared, checkpoint.privacy = server_round, shared, privacy.state()
        save_checkpoint(run_dir, checkpoint)
        log.info("[%s %d/%d] %d sampled, %d replied, %d aggregated, train loss %s, %.1f s", phase, server_round,
                 num_rounds, row["sampled"], row["replies"], row["accepted"],
                 f"{row['train-loss']:.4f}" if "train-loss" in row else "-", row["seconds"])
        if phase == Phase.PERSONALIZE and config.evaluate_every and server_round % config.evaluate_every == 0 \
                and server_round < num_rounds:
            run_evaluation(grid, nodes, config, checkpoint, rounds, run_dir, final=False)
    return shared


def _norms(norms: list[float]) -> dict[str, float]:
    """The spread of the updates' L2 norms as received (before any server-side clipping): what
    to set dp-clip by."""
    if not norms:
        return {}
    return {"update-norm-median": statistics.median(norms), "update-norm-max": max(norms)}


def run_evaluation(
    grid: Grid, nodes: NodeWaiter, config: RunConfig, checkpoint: Checkpoint, rounds: RoundLog, run_dir: Path,
    final: bool, privacy: RunPrivacy | None = None,
) -> dict[str, Any] | None:
    """Every connected device (or `evaluate-clients` of them) evaluates its personalized model;
    the final evaluation writes the per-user table and the macro-average."""
    started = time.perf_counter()
    strategy = _strategy(config)
    server_round = checkpoint.round if not final else config.rounds
    instruction = RoundInstruction(Phase.PERSONALIZE, server_round, checkpoint.run_id, checkpoint.expert_digest or "")
    connected = nodes.nodes(config.evaluate_clients or config.clients_per_round, config.min_replies)
    layout = SharedLayout.of(checkpoint.shared)
    messages = list(strategy.configure_evaluate(
        server_round, layout.encode(checkpoint.shared, config.transport_dtype, config.pack_shared),
        ConfigRecord({**instruction.to_config(), **layout.to_config()}), NodeSnapshot(grid, connected)))
    replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    metrics = strategy.aggregate_evaluate(server_round, replies)
    users = [{"node_id": reply.metadata.src_node_id, **dict(next(iter(reply.content.metric_records.values())))}
             for reply in strategy.accepted] if metrics is not None else []
    if final and not users:
        raise _failed(f"the evaluation after round {server_round}", replies, config.min_replies)
    extra = {"privacy": privacy.summary()} if privacy is not None else {}
    summary = write_evaluation(run_dir, users, extra) if final else None
    macro = summary["macro_average"] if summary else {}
    rounds.append({"phase": Phase.PERSONALIZE if not final else Phase.EVALUATE, "round": server_round,
                   "sampled": len(messages), "replies": len(replies), "accepted": len(users),
                   "seconds": time.perf_counter() - started, **(dict(metrics) if metrics else {}),
                   **{f"macro-{k}": v for k, v in macro.items()}})
    log.info("[evaluate after round %d] %d users: %s", server_round, len(users),
             ", ".join(f"{k} {v:.4f}" for k, v in (dict(metrics) if metrics else {}).items()))
    if metrics:
        log.info("[evaluate after round %d] %s", server_round, side_by_side(dict(metrics)))
    return summary


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
