"""Benchmark 2, simulation scale: a Flower simulation of many synthetic users, each trained
for about one local epoch. Reports simulated users per hour, each client's set-up time
(resident base, adapters swapped) against its training time, and the resident memory of the
process that runs the clients over the run: with user stores and personal adapters on disk,
it must not grow with the users.

Two runtimes:
  flower     our SuperLink in simulation mode, `flwr run` (the default); `concurrency` Ray
             workers, each holding one resident base and running one client at a time,
             through Flower's own client resources (the CPUs split among them, and on CUDA
             `num-gpus` = 1/concurrency each); `concurrency_sweep` runs one simulation per
             value and plots users/hour against it
  inprocess  the same ServerApp and ClientApp code and messages in this one process
             (simulations/inprocess.py): no transport, for machines without Ray (a lent
             GPU machine); on CUDA it also samples the GPU memory the clients hold.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path

import psutil
import torch

from shared.loading import resolve_device
from shared.paths import atomic_write_json, atomic_write_png
from shared.run_config import RunConfig
from shared.wire import Phase
from simulations.datasets import build_synthetic_users
from simulations.operations.deployment import local_simulation, run_app

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
SAMPLES_PER_USER = 40  # 36 training samples: one epoch is 5 steps of 8


class WorkerMemory(threading.Thread):
    """Samples, every `period` seconds, the resident memory of the processes that run the
    clients: the simulation's Ray workers (those whose environment holds `marker`), or this
    process when `marker` is None; and, on CUDA, the GPU memory this process has allocated."""

    def __init__(self, marker: str | None, period: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.marker, self.period = marker, period
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB summed over workers)
        self.workers = 0  # the most worker processes seen at once
        self.cuda_samples: list[tuple[float, float]] = []  # (seconds since start, MiB allocated on the GPU)
        self._stop_event = threading.Event()

    def _rss(self) -> int:
        if self.marker is None:
            self.workers = 1
            return psutil.Process().memory_info().rss
        total, workers = 0, 0
        for proc in psutil.process_iter(["environ", "cmdline", "memory_info"], ad_value=None):
            environ, cmdline = proc.info["environ"] or {}, " ".join(proc.info["cmdline"] or [])
            if "ClientAppActor" in cmdline and proc.info["memory_info"] is not None and \
                    self.marker in environ.values():
                total += proc.info["memory_info"].rss
                workers += 1
        self.workers = max(self.workers, workers)
        return total

    def run(self) -> None:
        started = time.monotonic()
        while not self._stop_event.wait(self.period):
            now, total = time.monotonic() - started, self._rss()
            if total:
                self.samples.append((now, total / 2**20))
            if self.marker is None and torch.cuda.is_available() and torch.cuda.is_initialized():
                self.cuda_samples.append((now, torch.cuda.memory_allocated() / 2**20))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


RUNTIMES = ("flower", "inprocess")


def is_scale_folder(out_dir: Path) -> bool:
    """Whether `out_dir` holds a scale benchmark's own folders, or a concurrency sweep's (which
    a rerun resumes)."""
    out_dir = Path(out_dir)
    if (out_dir / "run" / "config.json").is_file() or (out_dir / "users").is_dir():
        return True
    return any(is_scale_folder(folder) for folder in out_dir.glob("concurrency-*"))


def scale_benchmark(users: int, clients_per_round: int, out_dir: Path, model: str = "tiny",
                    batch_size: int = 8, timeout: float = 6 * 3600, runtime: str = "flower",
                    device: str = "auto", concurrency: int = 1, compile_layers: bool = False) -> dict:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    if concurrency < 1 or (concurrency > 1 and runtime != "flower"):
        raise ValueError(f"concurrency {concurrency}: at least 1, and above 1 only with the flower runtime")
    out_dir = Path(out_dir).absolute()
    users_dir = out_dir / "users"
    started = time.perf_counter()
    build_synthetic_users(users_dir, n_users=users, samples_per_user=SAMPLES_PER_USER)
    log.info("%d synthetic user stores ready in %.0f s", users, time.perf_counter() - started)
    rounds = math.ceil(users / clients_per_round)
    run_dir = out_dir / "run"
    run_config = {
        "base.model": model, "users.dataset": "synthetic", "users.dir": str(users_dir), "train.method": "nextquill",
        "expert.rounds": 1, "federation.rounds": rounds, "federation.clients-per-round": clients_per_round,
        "federation.local-steps": math.ceil(0.9 * SAMPLES_PER_USER / batch_size), "train.batch-size": batch_size,
        "evaluate.clients": min(users, 8), "federation.run-dir": str(run_dir), "base.device": device,
        "train.compile-layers": compile_layers,
    }
    if runtime == "flower":
        with local_simulation(out_dir / "flwr") as simulation:
            memory = WorkerMemory(simulation.marker)
            memory.start()
            try:
                run_id = run_app(simulation, REPO, run_config, timeout,
                                 federation_config=client_resources(users, concurrency, device)).run_id
            finally:
                memory.stop()
    else:
        run_id = None
        memory = _run_in_process(run_config, users)
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    personalize = [r for r in rows if r["phase"] == Phase.PERSONALIZE and r.get("aggregated")]
    trained = sum(r["accepted"] for r in personalize)
    seconds = sum(r["seconds"] for r in personalize)

    def mean(key: str) -> float:  # per client, each round's aggregate weighted by its clients
        return sum(r[key] * r["accepted"] for r in personalize) / max(1, trained)

    rss_first, rss_last = _first_and_last_tenth_peaks(memory.samples)
    cuda_first, cuda_last = _first_and_last_tenth_peaks(memory.cuda_samples)
    result = {
        "benchmark": "simulation scale", "runtime": runtime, "model": model, "users": users,
        "concurrency": concurrency, "compile_layers": compile_layers, "workers_seen": memory.workers,
        "clients_per_round": clients_per_round, "rounds": rounds, "run_id": run_id,
        "device": _device_name(device) if runtime == "inprocess" else f"Ray worker, device={device!r}",
        "clients_trained": trained, "personalization_seconds": seconds,
        "users_per_hour": 3600 * trained / seconds,
        "setup_seconds_per_client": mean("setup-seconds"), "weights_seconds_per_client": mean("weights-seconds"),
        "train_seconds_per_client": mean("train-seconds"),
        "setup_share_of_round": mean("setup-seconds") / (mean("setup-seconds") + mean("weights-seconds")
                                                         + mean("train-seconds")),
        "worker_rss_mib_first_tenth": rss_first, "worker_rss_mib_last_tenth": rss_last,
        "rss_mib_per_worker_last_tenth": rss_last / max(1, memory.workers) if rss_last else None,
        "worker_rss_mib": memory.samples,
        "cuda_allocated_mib_first_tenth": cuda_first, "cuda_allocated_mib_last_tenth": cuda_last,
        "cuda_allocated_mib": memory.cuda_samples,
    }
    atomic_write_json(out_dir / "scale.json", result)
    _plot_memory(memory.samples, memory.cuda_samples, out_dir / "worker_memory.png", users)
    print(f"{users} users, {clients_per_round} per round, {rounds} rounds, {concurrency} at once: "
          f"{result['users_per_hour']:.0f} users/hour; "
          f"set-up {result['setup_seconds_per_client']:.3f} s, token weights {result['weights_seconds_per_client']:.3f}"
          f" s, training {result['train_seconds_per_client']:.2f} s per client (set-up "
          f"{result['setup_share_of_round']:.1%} of a client's round); client process memory "
          f"{result['worker_rss_mib_first_tenth']:.0f} -> {result['worker_rss_mib_last_tenth']:.0f} MiB"
          + (f"; GPU allocated {result['cuda_allocated_mib_first_tenth']:.0f} -> "
             f"{result['cuda_allocated_mib_last_tenth']:.0f} MiB" if memory.cuda_samples else ""))
    return result


def client_resources(users: int, concurrency: int, device: str) -> dict[str, int | float]:
    """Flower's simulation options for `concurrency` clients at once: Ray runs as many
    ClientApp workers as the resources allow, so each asks for its share of the CPUs and, on
    CUDA, of the one GPU."""
    on_cuda = resolve_device(device).type == "cuda"
    options: dict[str, int | float] = {"num-supernodes": users,
                                       "client-resources-num-cpus": max(1, (os.cpu_count() or 1) // concurrency)}
    if on_cuda:
        options["client-resources-num-gpus"] = round(1 / concurrency, 4)
    return options


def concurrency_sweep(values: list[int], users: int, clients_per_round: int, out_dir: Path, **options) -> dict:
    """One simulation per concurrency in `values`, each in its own folder (a finished one is
    read back, so a rerun resumes the sweep); users/hour against concurrency, as JSON and a plot."""
    out_dir = Path(out_dir).absolute()
    rows = []
    for concurrency in values:
        folder = out_dir / f"concurrency-{concurrency}"
        done = folder / "scale.json"
        result = json.loads(done.read_text()) if done.is_file() else scale_benchmark(
            users, clients_per_round, folder, concurrency=concurrency, **options)
        if result.get("compile_layers", False) != options.get("compile_layers", False):
            raise ValueError(f"{done} was measured with compile-layers={result.get('compile_layers', False)}: "
                             "a sweep resumes only with the same settings; choose another --out")
        rows.append({key: result[key] for key in (
            "concurrency", "users_per_hour", "setup_seconds_per_client", "weights_seconds_per_client",
            "train_seconds_per_client", "workers_seen", "rss_mib_per_worker_last_tenth",
            "cuda_allocated_mib_last_tenth")})
    best = max(rows, key=lambda row: row["users_per_hour"])
    sweep = {"benchmark": "simulation scale, concurrency sweep", "users": users,
             "clients_per_round": clients_per_round, **options, "rows": rows, "best_concurrency": best["concurrency"]}
    atomic_write_json(out_dir / "concurrency.json", sweep)
    _plot_sweep(rows, out_dir / "users_per_hour.png", f"{options.get('model', 'tiny')}, {users} users")
    for row in rows:
        print(f"concurrency {row['concurrency']}: {row['users_per_hour']:.0f} users/hour, training "
              f"{row['train_seconds_per_client']:.2f} s per client")
    return sweep


def _first_and_last_tenth_peaks(samples: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """The highest sample in the first and in the last tenth of a run (None without samples)."""
    if not samples:
        return None, None
    tenth = max(1, len(samples) // 10)
    return max(m for _, m in samples[:tenth]), max(m for _, m in samples[-tenth:])


def _device_name(device: str) -> str:
    resolved = resolve_device(device)
    return f"{resolved}: {torch.cuda.get_device_name(resolved)}" if resolved.type == "cuda" else str(resolved)


def _run_in_process(run_config: dict, users: int) -> WorkerMemory:
    """The federation in this process: real ServerApp and ClientApp code, no transport."""
    from client.client_app import app as client_app
    from coordinator.federation import run_federation
    from simulations.inprocess import InProcessGrid

    config = RunConfig.from_flower(run_config)
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": users} for i in range(users)],
                         config.to_flower())
    memory = WorkerMemory(None)
    memory.start()
    try:
        run_federation(grid, config)
    finally:
        memory.stop()
    return memory


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    fig, ax = _pyplot().subplots(figsize=(5, 3.2))
    ax.plot([r["concurrency"] for r in rows], [r["users_per_hour"] for r in rows], marker="o", color="#4c72b0")
    ax.set_xlabel("clients at once (Ray workers)")
    ax.set_ylabel("simulated users per hour")
    ax.set_xticks([r["concurrency"] for r in rows])
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_png(fig, path)


def _plot_memory(samples: list[tuple[float, float]], cuda_samples: list[tuple[float, float]], path: Path,
                 users: int) -> None:
    if not samples:
        return
    fig, ax = _pyplot().subplots(figsize=(6, 3.2))
    ax.plot([t / 60 for t, _ in samples], [m for _, m in samples], color="#4c72b0")
    ax.set_xlabel("minutes into the run")
    ax.set_ylabel("client process RSS (MiB)")
    ax.set_ylim(bottom=0)
    if cuda_samples:
        ax.plot([t / 60 for t, _ in cuda_samples], [m for _, m in cuda_samples], color="#dd8452", linewidth=0.8,
                label="GPU memory allocated (MiB)")
        ax.set_ylabel("MiB")
        ax.lines[0].set_label("client process RSS (MiB)")
        ax.legend(loc="center right", fontsize=8)
    ax.set_title(f"{users} simulated users")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write_png(fig, path)
