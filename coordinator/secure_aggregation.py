"""A training round under secure aggregation, with Flower's own SecAgg+.

Flower hosts SecAgg+ only in its workflow API: `SecAggPlusWorkflow`, which drives a legacy
`Strategy` through a `LegacyContext`. It runs on any `Grid`, so with `secagg.enabled` on,
a round of this Message-API ServerApp hands the round to it, with the same sampling and the
same device code (the devices' side: `client/secure_aggregation.py`):

  setup, share keys   each sampled device makes two key pairs and sends Shamir shares of its
                      secrets, encrypted, to `secagg-shares` of the others (through here);
  masked vectors      each device trains and sends its shared parameters and train metrics,
                      quantized and hidden under a private mask and pairwise masks;
  unmask              the devices send the shares that remove the masks of the sum, and of
                      devices that dropped out (`secagg-threshold` of a device's shares are
                      needed): the coordinator learns the sum and nothing else.

What it costs and changes: every value is clipped to ±8 and quantized to 2^22 levels (error at
most 3.8e-6 per value, stochastic rounding, unbiased); a device uploads int64 masks (twice the
float32 update) and two more round trips; updates weigh the same (a weight would travel in
clear). What it does not hide: that a device took part, and the evaluation replies (per-user
metrics, in clear: the trial's per-user table is made of them). SecAgg+ assumes fewer than
`secagg-threshold` of a device's neighbours collude with the coordinator; Flower's masks are
drawn from 32-bit seeds (`pseudo_rand_gen`), which is Flower's choice, not reviewed here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import Metrics, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from coordinator.strategy import RoundOutcome
from shared.run_config import RunConfig
from shared.wire import SECURE_METRICS, SharedLayout, metrics_from_mean

log = logging.getLogger("flwr.nextquill")

MASK_ITEM_BYTES = 8  # SecAgg+ masks and sends int64


def secure_round(grid: Grid, config: RunConfig, server_round: int, shared: Mapping[str, torch.Tensor],
                 instruction: Mapping[str, Any], nodes: list[int]) -> RoundOutcome:
    """One training round over `nodes` (already sampled) under SecAgg+: the mean of their
    shared parameters and train metrics, which is all the coordinator learns (the outcome's
    replies and accepted: the devices in the sum; its upload: a device's masked vector, to
    which the key exchange adds a few kB)."""
    layout = SharedLayout.of(shared)
    summed: list[int] = []

    def count_summed(fit_metrics: list[tuple[int, Metrics]]) -> Metrics:
        summed.append(len(fit_metrics))
        return {}

    strategy = LegacyFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(nodes),
                            min_available_clients=len(nodes), accept_failures=True,
                            on_fit_config_fn=lambda _: {**instruction, **layout.to_config()},
                            fit_metrics_aggregation_fn=count_summed)
    clients = SimpleClientManager()
    for node in nodes:
        clients.register(GridClientProxy(node, grid, run_id=0))
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
                        MAIN_PARAMS_RECORD: layout.encode(shared, "float32", packed=True)})
    sent = state.array_records[MAIN_PARAMS_RECORD]
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            ServerConfig(num_rounds=server_round), strategy, clients)
    workflow = SecAggPlusWorkflow(num_shares=config.secagg.shares, reconstruction_threshold=config.secagg.threshold,
                                  max_weight=1.0, timeout=config.federation.round_timeout)
    workflow(grid, context)

    values = layout.numel + 2 * len(SECURE_METRICS) + 1  # + SecAgg+'s weight
    upload = values * MASK_ITEM_BYTES
    aggregated = context.state.array_records[MAIN_PARAMS_RECORD]
    if aggregated is sent:
        log.warning("round %d: secure aggregation halted (too few devices left to unmask): nothing aggregated",
                    server_round)
        return RoundOutcome(None, {}, len(nodes), 0, 0, upload)
    arrays = parameters_to_ndarrays(arrayrecord_to_parameters(aggregated, keep_input=True))
    names = list(sent)  # the one packed array sent; then the metrics vector
    if len(arrays) != len(names) + 1:
        raise RuntimeError(f"secure aggregation returned {len(arrays)} arrays for {len(names)} sent")
    mean = layout.decode(ArrayRecord({name: Array(np.asarray(array, dtype=np.float32).reshape(sent[name].shape))
                                      for name, array in zip(names, arrays[:-1], strict=True)}))
    devices = summed[-1] if summed else 0
    return RoundOutcome(mean, metrics_from_mean(arrays[-1]), len(nodes), devices, devices, upload)
