"""Benchmark 6, secure aggregation: what SecAgg+ costs per training round, on a real loopback
deployment (a SuperLink and one SuperNode per client as processes, `flwr run`), against the
same run without it, in the same invocation.

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

from coordinator.report import RoundLog
from shared.loading import resolve_model_dir
from shared.paths import atomic_write_json
from simulations.datasets import build_synthetic_users
from simulations.deployment import local_deployment, run_app
from simulations.wire_audit import PULL_OBJECT, PUSH_MESSAGES, PUSH_OBJECT, WireRecorder, http_exchanges

REPO = Path(__file__).parents[1]
MODES = {"plain FedAvg": False, "SecAgg+": True}


def _run(model_dir: Path, users: list[Path], work: Path, rounds: int, secure: bool) -> dict:
    """One deployment and run: its wire bytes per direction and its training rounds' seconds."""
    run_dir = work / "run"
    run_config = {
        "model": str(model_dir), "device": "cpu", "method": "sft", "expert-rounds": 0, "rounds": rounds,
        "clients-per-round": len(users), "local-steps": 1, "batch-size": 4, "evaluate-base": False,
        "run-dir": str(run_dir), "secure-aggregation": secure,
    }
    with WireRecorder() as recorder, local_deployment(
            work / "flwr", [{"user-dir": str(p)} for p in users], work / "certs",
            node_envs=[{"NEXTQUILL_HOME": str(work / f"device-{i}")} for i in range(len(users))],
            tls=False, supernode_route=recorder.forward_to) as deployment:
        run_app(deployment, REPO, run_config, timeout=1800)
        connections = list(recorder.connections)
    up = down = 0
    for connection in connections:
        for exchange in http_exchanges(connection):
            if exchange.path in (PUSH_OBJECT, PUSH_MESSAGES):
                up += len(exchange.request_body)
            elif exchange.path == PULL_OBJECT:
                down += len(exchange.response_body)
    rows = RoundLog(run_dir).rows
    seconds = [row["seconds"] for row in rows if row["phase"] == "personalize" and "aggregated" in row]
    return {"up": up, "down": down, "seconds": seconds,
            "upload_bytes_per_client": rows[0]["upload_bytes_per_client"]}


def secagg_benchmark(model: str, clients: int, rounds: int, out: Path) -> dict:
    if rounds < 2:
        raise ValueError(f"--rounds must be at least 2 (one round's cost is a difference of runs), got {rounds}")
    model_dir = resolve_model_dir(model)
    result_rows = []
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as scratch:
        users = build_synthetic_users(Path(scratch) / "users", n_users=clients, samples_per_user=10)
        for name, secure in MODES.items():
            short = _run(model_dir, users, Path(scratch) / f"{secure}-1", 1, secure)
            long = _run(model_dir, users, Path(scratch) / f"{secure}-{rounds}", rounds, secure)
            extra = rounds - 1
            result_rows.append({
                "mode": name, "seconds_per_round": statistics.median(long["seconds"]),
                "wire_up_bytes_per_client_round": (long["up"] - short["up"]) / extra / clients,
                "wire_down_bytes_per_client_round": (long["down"] - short["down"]) / extra / clients,
                "update_bytes": long["upload_bytes_per_client"],
            })
            print(f"{name}: {result_rows[-1]}", flush=True)
    plain = result_rows[0]
    for row in result_rows:
        for key in ("seconds_per_round", "wire_up_bytes_per_client_round", "wire_down_bytes_per_client_round"):
            row[f"{key}_vs_plain"] = row[key] / plain[key]
    result = {"benchmark": "secure aggregation", "model": model, "clients": clients, "rounds": rounds,
              "rows": result_rows}
    atomic_write_json(out, result)
    print(secagg_table(result))
    return result


def secagg_table(result: dict) -> str:
    lines = [f"one training round, {result['model']}, {result['clients']} clients (sft, 1 local step)",
             "| mode | seconds | × plain | up bytes / client | × plain | down bytes / client | × plain |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        cells = [row["mode"], f"{row['seconds_per_round']:.1f}", f"{row['seconds_per_round_vs_plain']:.2f}"]
        for direction in ("up", "down"):
            key = f"wire_{direction}_bytes_per_client_round"
            cells += [f"{row[key]:,.0f}", f"{row[key + '_vs_plain']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
