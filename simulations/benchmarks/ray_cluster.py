"""Benchmark: a Flower simulation on a Ray cluster of several nodes against the same simulation
on one machine, same run config and seed; do their metrics match, and where did the clients run?

Both runs go through our SuperLink in simulation mode and `flwr run` (deployment.py): on one
machine Flower starts its own Ray (`init-args-num-cpus` = the cluster's CPUs); on the cluster
(ray_cluster.py: a head and worker nodes, each a `ray start` of its own on 127.0.0.1) the
SuperLink's environment names the head in RAY_ADDRESS. Each ClientApp actor asks for one CPU
(`client-resources-num-cpus`), so both runs hold as many actors as the cluster has CPUs, and
on the cluster Ray places them on every node; the nodes' actor processes are sampled while the
run goes on. Every user trains in every round: Flower's simulation gives its nodes random ids,
so a sample of fewer devices would draw other users in each run, on one machine as well.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from shared.paths import atomic_write_json, atomic_write_text
from simulations.operations.deployment import ConfigValue, local_simulation, run_app
from simulations.operations.processes import DeploymentError
from simulations.operations.ray_cluster import RayCluster, in_private_loopback, local_ray_cluster

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
# Per-round fields that measure time or place, not the federation's outcome.
_NOT_COMPARED = ("seconds",)
RUNS = ("one-machine", "cluster")
_INFO = "run-info.json"  # beside a finished run: its time and, on the cluster, where its clients ran


class ActorPlacement(threading.Thread):
    """Samples, every `period` seconds, which Flower ClientApp actors run on each node, and
    where each node's processes listen (the actors' own servers included)."""

    def __init__(self, cluster: RayCluster, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.cluster, self.period = cluster, period
        self.actors: dict[str, set[int]] = {node.name: set() for node in cluster.nodes}
        self.listening: dict[str, set[str]] = {node.name: node.listening() for node in cluster.nodes}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            for node in self.cluster.nodes:
                self.actors[node.name] |= node.client_actors()
                self.listening[node.name] |= node.listening()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def ray_cluster_benchmark(run_config: Mapping[str, ConfigValue], supernodes: int, out: Path, *, nodes: int = 2,
                          cpus_per_node: int = 1, timeout: float = 3 * 3600) -> dict:
    """The federation of `run_config` with `supernodes` simulated devices, on one machine and
    on a loopback Ray cluster of `nodes` nodes; writes `<out>/ray-cluster.json` and a table. A
    rerun into the same `out` keeps a finished run and resumes an interrupted one (from its
    coordinator checkpoint)."""
    if not in_private_loopback():
        raise DeploymentError("run this benchmark through `python -m simulations.benchmarks ray-cluster`, which "
                              "starts it in a network namespace of its own (simulations/operations/ray_cluster.py)")
    out = Path(out).absolute()
    cpus = nodes * cpus_per_node
    config = {**run_config, "federation.clients-per-round": supernodes, "federation.min-replies": supernodes}
    simulation = {"num-supernodes": supernodes, "client-resources-num-cpus": 1}
    asked = {"run_config": config, "supernodes": supernodes, "nodes": nodes, "cpus": cpus}
    runs = {name: _finished(out / name, asked) for name in RUNS}
    if runs["one-machine"] is None:
        log.info("one machine: the federation of %d users (Flower's log: %s)", supernodes, out / "one-machine" / "flwr")
        started = time.perf_counter()
        with local_simulation(out / "one-machine" / "flwr") as deployment:
            run_app(deployment, REPO, {**config, "federation.run-dir": str(out / "one-machine" / "run")}, timeout,
                    federation_config={**simulation, "init-args-num-cpus": cpus})
        runs["one-machine"] = _record(out / "one-machine", {**asked, "seconds": time.perf_counter() - started})
    if runs["cluster"] is None:
        started = time.perf_counter()
        with local_ray_cluster(out / "cluster" / "logs", nodes=nodes, cpus_per_node=cpus_per_node) as cluster:
            log.info("cluster at %s: the same federation (Flower's log: %s)", cluster.address,
                     out / "cluster" / "flwr")
            with local_simulation(out / "cluster" / "flwr", ray_address=cluster.address) as deployment:
                placement = ActorPlacement(cluster)
                placement.start()
                try:
                    run_app(deployment, REPO, {**config, "federation.run-dir": str(out / "cluster" / "run")}, timeout,
                            federation_config=simulation)
                finally:
                    placement.stop()
        runs["cluster"] = _record(out / "cluster", {
            **asked, "seconds": time.perf_counter() - started, "ray_address": cluster.address,
            "actors_per_node": {name: len(pids) for name, pids in placement.actors.items()},
            "listening": {name: sorted(addresses) for name, addresses in placement.listening.items()}})
    differences = compare_rounds(out / "one-machine" / "run" / "rounds.jsonl", out / "cluster" / "run" / "rounds.jsonl")
    result = {
        "benchmark": "Flower simulation on a Ray cluster", "run_config": config, "supernodes": supernodes,
        "nodes": nodes, "cpus_per_node": cpus_per_node, "runs": runs, "differences": differences,
        "largest_difference": max((d["max_abs_difference"] for d in differences.values()), default=0.0),
        "every_node_ran_clients": all(runs["cluster"]["actors_per_node"].values()),
        "summaries": {name: _summary(out / name / "run") for name in RUNS},
    }
    table = report(result)
    atomic_write_json(out / "ray-cluster.json", result)
    atomic_write_text(out / "ray-cluster.md", table)
    print(table)
    return result


def is_ray_cluster_folder(out: Path) -> bool:
    """Whether `out` holds this benchmark's own runs (a rerun resumes them)."""
    return any((Path(out) / name / "run" / "config.json").is_file() for name in RUNS)


def _finished(folder: Path, asked: dict) -> dict | None:
    """What a finished run recorded, or None when it has not finished (a rerun resumes it).
    Raises when it was made with other settings."""
    info = folder / _INFO
    if not (info.is_file() and (folder / "run" / "summary.json").is_file()):
        return None
    recorded = json.loads(info.read_text())
    different = sorted(key for key in asked if recorded.get(key) != asked[key])
    if different:
        raise ValueError(f"{folder} holds a run made with other settings ({', '.join(different)}); choose another "
                         "--out")
    log.info("%s: finished earlier, kept (%s)", folder.name, folder)
    return recorded


def _record(folder: Path, info: dict) -> dict:
    atomic_write_json(folder / _INFO, info)
    return info


def compare_rounds(first: Path, second: Path) -> dict[str, dict]:
    """Per metric of rounds.jsonl (counts and bytes included, times excluded): the largest
    absolute difference between the two runs over every (phase, round). Raises when the two
    runs do not have the same rounds or the same metrics."""
    # In file order: a round can have two rows (its training and its periodic evaluation).
    rows = [[json.loads(line) for line in path.read_text().splitlines() if line.strip()] for path in (first, second)]
    rounds = [[(r["phase"], r["round"]) for r in run] for run in rows]
    if rounds[0] != rounds[1]:
        raise ValueError(f"{first} and {second} went through other rounds ({len(rounds[0])} rows against "
                         f"{len(rounds[1])}): the runs do not compare")
    differences: dict[str, dict] = {}
    for row, other in zip(*rows, strict=True):
        key = (row["phase"], row["round"])
        if set(row) != set(other):
            raise ValueError(f"{key}: the runs reported other metrics ({sorted(set(row) ^ set(other))})")
        for metric, value in row.items():
            if metric in ("phase", "round") or metric.endswith(_NOT_COMPARED) or isinstance(value, str):
                continue
            gap = _gap(value, other[metric])
            entry = differences.setdefault(metric, {"max_abs_difference": 0.0, "at": None})
            if gap > entry["max_abs_difference"] or entry["at"] is None:
                entry.update(max_abs_difference=gap, at=f"{key[0]} {key[1]}")
    return differences


def _gap(a: float | bool | None, b: float | bool | None) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b)


def _summary(run_dir: Path) -> dict:
    macro = json.loads((run_dir / "summary.json").read_text())["macro_average"]
    return {key: value for key, value in macro.items()
            if not key.endswith("_std") and key.split("-")[-1] in ("rouge1", "nll")}


def report(result: dict) -> str:
    runs, summaries = result["runs"], result["summaries"]
    lines = [f"Flower simulation, {result['supernodes']} users, every one in every round: one machine against a Ray "
             f"cluster of {result['nodes']} nodes x {result['cpus_per_node']} CPU on 127.0.0.1", "",
             "| | one machine | cluster |", "|---|---|---|"]
    for key in summaries["one-machine"]:
        if all(math.isnan(summaries[name][key]) for name in summaries):  # the base, when not evaluated
            continue
        lines.append(f"| {key} | {summaries['one-machine'][key]:.4f} | {summaries['cluster'][key]:.4f} |")
    lines.append(f"| seconds | {runs['one-machine']['seconds']:.0f} | {runs['cluster']['seconds']:.0f} |")
    placed = ", ".join(f"{name}: {count}" for name, count in runs["cluster"]["actors_per_node"].items())
    lines += ["", f"ClientApp actors seen per node: {placed}",
              f"largest difference of any round's metric: {result['largest_difference']:.3g}"]
    return "\n".join(lines) + "\n"
