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


class ActorPlacement(threading.Thread):
    """Samples, every `period` seconds, which Flower ClientApp actors run on each node."""

    def __init__(self, cluster: RayCluster, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.cluster, self.period = cluster, period
        self.actors: dict[str, set[int]] = {node.name: set() for node in cluster.nodes}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            for node in self.cluster.nodes:
                self.actors[node.name] |= node.client_actors()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def ray_cluster_benchmark(run_config: Mapping[str, ConfigValue], supernodes: int, out: Path, *, nodes: int = 2,
                          cpus_per_node: int = 1, timeout: float = 3 * 3600) -> dict:
    """The federation of `run_config` with `supernodes` simulated devices, on one machine and
    on a loopback Ray cluster of `nodes` nodes; writes `<out>/ray-cluster.json` and a table."""
    if not in_private_loopback():
        raise DeploymentError("run this benchmark through `nextquill benchmarks ray-cluster`, which starts it in a "
                              "network namespace of its own (simulations/operations/ray_cluster.py)")
    out = Path(out).absolute()
    cpus = nodes * cpus_per_node
    config = {**run_config, "federation.clients-per-round": supernodes, "federation.min-replies": supernodes}
    simulation = {"num-supernodes": supernodes, "client-resources-num-cpus": 1}
    runs = {}
    started = time.perf_counter()
    log.info("one machine: the federation of %d users (Flower's log: %s)", supernodes, out / "one-machine" / "flwr")
    with local_simulation(out / "one-machine" / "flwr") as deployment:
        config["federation.run-dir"] = str(out / "one-machine" / "run")
        run_app(deployment, REPO, config, timeout, federation_config={**simulation, "init-args-num-cpus": cpus})
    runs["one-machine"] = {"seconds": time.perf_counter() - started}
    log.info("one machine: done in %.0f s; now the cluster of %d nodes", runs["one-machine"]["seconds"], nodes)
    started = time.perf_counter()
    with local_ray_cluster(out / "cluster" / "logs", nodes=nodes, cpus_per_node=cpus_per_node) as cluster:
        listening = {node.name: sorted(node.listening()) for node in cluster.nodes}
        log.info("cluster at %s: the same federation (Flower's log: %s)", cluster.address, out / "cluster" / "flwr")
        with local_simulation(out / "cluster" / "flwr", ray_address=cluster.address) as deployment:
            config["federation.run-dir"] = str(out / "cluster" / "run")
            placement = ActorPlacement(cluster)
            placement.start()
            try:
                run_app(deployment, REPO, config, timeout, federation_config=simulation)
            finally:
                placement.stop()
    runs["cluster"] = {"seconds": time.perf_counter() - started, "ray_address": cluster.address,
                       "actors_per_node": {name: len(pids) for name, pids in placement.actors.items()},
                       "listening": listening}
    differences = compare_rounds(out / "one-machine" / "run" / "rounds.jsonl", out / "cluster" / "run" / "rounds.jsonl")
    result = {
        "benchmark": "Flower simulation on a Ray cluster", "run_config": dict(config), "supernodes": supernodes,
        "nodes": nodes, "cpus_per_node": cpus_per_node, "runs": runs, "differences": differences,
        "largest_difference": max((d["max_abs_difference"] for d in differences.values()), default=0.0),
        "every_node_ran_clients": all(runs["cluster"]["actors_per_node"].values()),
        "summaries": {name: _summary(out / name / "run") for name in ("one-machine", "cluster")},
    }
    atomic_write_json(out / "ray-cluster.json", result)
    atomic_write_text(out / "ray-cluster.md", report(result))
    print(report(result))
    return result


def compare_rounds(first: Path, second: Path) -> dict[str, dict]:
    """Per metric of rounds.jsonl (counts and bytes included, times excluded): the largest
    absolute difference between the two runs over every (phase, round). Raises when the two
    runs do not have the same rounds or the same metrics."""
    rows = [{(r["phase"], r["round"]): r for r in map(json.loads, path.read_text().splitlines())}
            for path in (first, second)]
    if rows[0].keys() != rows[1].keys():
        raise DeploymentError(f"the runs went through other rounds: {sorted(rows[0])} against {sorted(rows[1])}")
    differences: dict[str, dict] = {}
    for key, row in rows[0].items():
        other = rows[1][key]
        if set(row) != set(other):
            raise DeploymentError(f"{key}: the runs reported other metrics ({sorted(set(row) ^ set(other))})")
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
