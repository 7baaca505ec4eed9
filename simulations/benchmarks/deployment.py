"""Benchmarks on a real loopback deployment (a SuperLink and one SuperNode per client as
processes, `flwr run`): what one training round costs in one mode against another, in the
same invocation.

  secagg  (benchmark 6) SecAgg+ against plain FedAvg;
  wire    (benchmark 3) the shared parameters packed into one array against one array per
          parameter: wire bytes against the update's own bytes.

Bytes are wire bytes, counted by a recording proxy in front of the SuperLink (TLS off for the
count; TLS adds a little per connection and nothing per byte): what SuperNodes push (objects and
replies, headers included) and what they pull (objects), with polling left out because it
depends on time, not on the protocol. One round's cost is the difference between a run of
`rounds` training rounds and a run of one, divided by `rounds - 1`, so that the evaluation and
the set-up cancel out. Seconds are the median of the coordinator's per-round times.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from coordinator.run_directory import RoundLog
from shared.loading import resolve_model_dir
from shared.paths import atomic_write_json
from simulations.datasets import build_synthetic_users
from simulations.operations.deployment import local_deployment, run_app
from simulations.operations.wire_audit import PULL_OBJECT, PUSH_MESSAGES, PUSH_OBJECT, WireRecorder, http_exchanges

REPO = Path(__file__).parents[2]
# Each benchmark's modes, baseline first: the run-config keys that make the difference.
MODES: dict[str, dict[str, dict[str, Any]]] = {
    "secagg": {"plain FedAvg": {"secagg.enabled": False}, "SecAgg+": {"secagg.enabled": True}},
    "wire": {"one array per parameter": {"sharing.pack": False}, "packed": {"sharing.pack": True}},
}
COUNTED = ("seconds_per_round", "wire_up_bytes_per_client_round", "wire_up_requests_per_client_round",
           "wire_down_bytes_per_client_round")


def _run(model_dir: Path, users: list[Path], work: Path, rounds: int, mode: dict[str, Any]) -> dict:
    """One deployment and run: its wire bytes and requests per direction and its training
    rounds' seconds."""
    run_dir = work / "run"
    run_config = {
        "base.model": str(model_dir), "base.device": "cpu", "train.method": "sft", "expert.rounds": 0,
        "federation.rounds": rounds, "federation.clients-per-round": len(users), "federation.local-steps": 1,
        "train.batch-size": 4, "evaluate.base": False, "federation.run-dir": str(run_dir), **mode,
    }
    with WireRecorder() as recorder, local_deployment(
            work / "flwr", [{"user-dir": str(p)} for p in users], work / "certs",
            node_envs=[{"NEXTQUILL_HOME": str(work / f"device-{i}")} for i in range(len(users))],
            tls=False, supernode_route=recorder.forward_to) as deployment:
        run_app(deployment, REPO, run_config, timeout=1800)
        connections = list(recorder.connections)
    up = down = requests = 0
    for connection in connections:
        for exchange in http_exchanges(connection):
            if exchange.path in (PUSH_OBJECT, PUSH_MESSAGES):
                up += len(exchange.request_body)
                requests += 1
            elif exchange.path == PULL_OBJECT:
                down += len(exchange.response_body)
    rows = RoundLog(run_dir).rows
    seconds = [row["seconds"] for row in rows if row["phase"] == "personalize" and "aggregated" in row]
    return {"up": up, "requests": requests, "down": down, "seconds": seconds,
            "upload_bytes_per_client": rows[0]["upload_bytes_per_client"]}


def deployment_benchmark(benchmark: str, model: str, clients: int, rounds: int, out: Path) -> dict:
    """Every mode of `benchmark` (a key of MODES), each as a run of `rounds` and a run of one."""
    if rounds < 2:
        raise ValueError(f"--rounds must be at least 2 (one round's cost is a difference of runs), got {rounds}")
    model_dir = resolve_model_dir(model)
    result_rows = []
    with tempfile.TemporaryDirectory(prefix=f"bench-{benchmark}-") as scratch:
        users = build_synthetic_users(Path(scratch) / "users", n_users=clients, samples_per_user=10)
        for index, (name, mode) in enumerate(MODES[benchmark].items()):
            short = _run(model_dir, users, Path(scratch) / f"{index}-1", 1, mode)
            long = _run(model_dir, users, Path(scratch) / f"{index}-{rounds}", rounds, mode)
            per_round = (rounds - 1) * clients
            result_rows.append({
                "mode": name, "seconds_per_round": statistics.median(long["seconds"]),
                "wire_up_bytes_per_client_round": (long["up"] - short["up"]) / per_round,
                "wire_up_requests_per_client_round": (long["requests"] - short["requests"]) / per_round,
                "wire_down_bytes_per_client_round": (long["down"] - short["down"]) / per_round,
                "update_bytes": long["upload_bytes_per_client"],
            })
            print(f"{name}: {result_rows[-1]}", flush=True)
    baseline = result_rows[0]
    for row in result_rows:
        for key in COUNTED:
            row[f"{key}_vs_baseline"] = row[key] / baseline[key]
        row["wire_up_over_update"] = row["wire_up_bytes_per_client_round"] / row["update_bytes"]
    result = {"benchmark": benchmark, "model": model, "clients": clients, "rounds": rounds, "rows": result_rows}
    atomic_write_json(out, result)
    print(deployment_table(result))
    return result


def deployment_table(result: dict) -> str:
    lines = [f"one training round, {result['model']}, {result['clients']} clients (sft, 1 local step)",
             "| mode | seconds | × baseline | up bytes / client | × baseline | up requests / client | × baseline | "
             "down bytes / client | × baseline | update bytes | wire up / update |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        cells = [row["mode"]]
        for key, shown in zip(COUNTED, ("{:.1f}", "{:,.0f}", "{:,.0f}", "{:,.0f}"), strict=True):
            cells += [shown.format(row[key]), f"{row[key + '_vs_baseline']:.2f}"]
        cells += [f"{row['update_bytes']:,}", f"{row['wire_up_over_update']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
