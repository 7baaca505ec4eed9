"""Benchmark 5, edge memory: the peak memory of one client round on a device, phase by
phase, as the ClientApp runs it: the 4-bit base resident, the expert's token weights for the
user's training samples, 5 NextQuill steps on the dual split (personal part saved), and the
evaluation of the personalized model with greedy generation on the held-out samples.

The user is a synthetic reviewer with enough reviews that most prompts fill the history
budget (`--history-tokens`, 2,048 by default): the padded batch, and so the peak, is a full
history wide. Each setting runs in a process of its own, so that its peaks are its own and an
out-of-memory failure is reported as "does not fit" instead of ending the benchmark.

On CUDA the peaks are PyTorch's allocated and reserved bytes, reset at every phase, and the
device memory the process holds with nothing allocated (CUDA context and library handles),
which a device's budget must also hold. On the CPU the peak is the resident set, sampled.
"""

from __future__ import annotations

import logging
import multiprocessing
import platform
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty

import psutil
import torch

from shared.config import BaseSpec, LoraSettings, PromptConfig, TrainConfig
from shared.loading import resolve_device
from shared.paths import atomic_write_json

log = logging.getLogger(__name__)
PHASES = ("base", "token-weights", "training", "evaluation")
RUN_NAME = "edge"


@dataclass(frozen=True)
class EdgeSetting:
    """One client round's knobs that decide its memory."""

    batch_size: int = 8
    lean_memory: bool = False
    generation_batch_size: int = 16
    fused_loss: bool = False


class PeakRss(threading.Thread):
    """The highest resident set of this process, sampled every `period` seconds."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self._process = period, 0, psutil.Process()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def reset(self) -> int:
        """The peak since the last reset; sampling goes on from the current value."""
        peak, self.peak = max(self.peak, self._process.memory_info().rss), self._process.memory_info().rss
        return peak

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _phase_peaks(on_cuda: bool, rss: PeakRss) -> dict[str, float]:
    peaks = {"rss_mib": rss.reset() / 2**20}
    if on_cuda:
        torch.cuda.synchronize()
        peaks |= {"cuda_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                  "cuda_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
        torch.cuda.reset_peak_memory_stats()
    return peaks


def client_round_memory(model_dir: str, spec: BaseSpec, prompt: PromptConfig, setting: EdgeSetting,
                        store_dir: str, steps: int) -> dict:
    """One client round on the user store at `store_dir` (a copy it may write to), with the
    peak memory of each phase."""
    from client.device import EXPERT_ADAPTER, Device, Expert
    from client.federated import evaluate_personalized, train_round
    from shared.adapters import save_adapter
    from shared.config import GenerationSettings
    from shared.split import SplitSpec
    from shared.user_store import UserStore

    device = resolve_device(spec.device)
    on_cuda = device.type == "cuda"
    row: dict = {"setting": asdict(setting)}
    if on_cuda:
        torch.cuda.init()
        torch.empty(1, device=device)  # the context and the caching allocator exist from here
        free, total = torch.cuda.mem_get_info(device)
        row["cuda_context_mib"] = (total - free) / 2**20
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRss()
    rss.start()
    try:
        phases = {}
        client = Device.load(BaseSpec(**{**asdict(spec), "model": model_dir}), LoraSettings(), prompt)
        phases["base"] = _phase_peaks(on_cuda, rss)
        store = UserStore.open(store_dir)
        expert_dir = Path(store_dir).parent / "expert"
        if not expert_dir.is_dir():
            save_adapter(client.host.new(EXPERT_ADAPTER, seed=1), expert_dir, adapter_name=EXPERT_ADAPTER,
                         metadata={"base": client.base_id})
        expert = Expert.from_dir(expert_dir)
        _phase_peaks(on_cuda, rss)
        client.expert_probs(store, expert)
        phases["token-weights"] = _phase_peaks(on_cuda, rss)
        split = SplitSpec("dual")
        config = TrainConfig(method="nextquill", max_steps=steps, batch_size=setting.batch_size,
                             lean_memory=setting.lean_memory, fused_loss=setting.fused_loss)
        shared_in = split.shared_state(client.host.new(*split.adapters, seed=config.seed))
        _phase_peaks(on_cuda, rss)
        started = time.perf_counter()
        result = train_round(client, store, split, shared_in, config, RUN_NAME, expert)
        phases["training"] = _phase_peaks(on_cuda, rss)
        row["train_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        evaluate_personalized(client, store, split, result.shared, "nextquill", RUN_NAME, config.seed,
                              generation=GenerationSettings(batch_size=setting.generation_batch_size))
        phases["evaluation"] = _phase_peaks(on_cuda, rss)
        row["evaluate_seconds"] = time.perf_counter() - started
    finally:
        rss.stop()
    row["phases"] = phases
    key = "cuda_reserved_mib" if on_cuda else "rss_mib"
    row["peak_mib"] = max(p[key] for p in phases.values())
    row["peak_phase"] = max(phases, key=lambda name: phases[name][key])
    if on_cuda:  # what the device must hold: the context beside the allocator's peak
        row["device_peak_mib"] = row["peak_mib"] + row["cuda_context_mib"]
    return row


def _child(queue, *args) -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        queue.put(("ok", client_round_memory(*args)))
    except torch.OutOfMemoryError as error:
        queue.put(("oom", str(error).splitlines()[0]))
    except Exception as error:  # reported beside the other settings' figures, not raised
        queue.put(("error", f"{type(error).__name__}: {error}"))


def _in_child(*args, timeout: float) -> tuple[str, dict | str]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, *args))
    child.start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            outcome = queue.get(timeout=5)
            break
        except Empty:
            if not child.is_alive():
                # killed from outside (the kernel's out-of-memory killer on the CPU) or crashed
                outcome = ("died", f"the process died with exit code {child.exitcode}")
                break
            if time.monotonic() > deadline:
                child.kill()
                outcome = ("timeout", f"no result within {timeout:.0f} s")
                break
    child.join()
    return outcome


def edge_benchmark(model: str, model_dir: Path, spec: BaseSpec, prompt: PromptConfig, settings: list[EdgeSetting],
                   out: Path, budget_mib: float, steps: int = 5, reviews: int = 72,
                   timeout: float = 1800.0) -> dict:
    """Every setting's client round in a fresh process; the result, with which settings fit
    `budget_mib`, written to `out`."""
    from simulations.datasets import build_reviewer_users

    rows = []
    with tempfile.TemporaryDirectory(prefix="nextquill-edge-") as scratch:
        (template,) = build_reviewer_users(Path(scratch) / "template", n_users=1, samples_per_user=reviews)
        for number, setting in enumerate(settings):
            store_dir = Path(scratch) / f"setting-{number}" / "user"
            shutil.copytree(template, store_dir)  # each setting starts from the same unwritten store
            started = time.perf_counter()
            status, value = _in_child(str(model_dir), spec, prompt, setting, str(store_dir), steps, timeout=timeout)
            row = value if status == "ok" else {"setting": asdict(setting), "failure": status, "detail": value}
            row["seconds"] = time.perf_counter() - started
            row["fits_budget"] = status == "ok" and row.get("device_peak_mib", row.get("peak_mib", 0)) <= budget_mib
            rows.append(row)
            log.info("%s: %s", setting, f"peak {row['peak_mib']:.0f} MiB in {row['peak_phase']}"
                     if status == "ok" else f"{status}: {value}")
    on_cuda = resolve_device(spec.device).type == "cuda"
    result = {
        "benchmark": "edge memory", "model": model, "spec": asdict(spec), "prompt": asdict(prompt), "steps": steps,
        "reviews": reviews, "budget_mib": budget_mib, "machine": platform.machine(), "on_cuda": on_cuda,
        "device_name": torch.cuda.get_device_name() if on_cuda else platform.processor(),
        "rows": rows,
    }
    atomic_write_json(out, result)
    print(render(result))
    return result


def render(result: dict) -> str:
    on_cuda = result["on_cuda"]
    prompt = result["prompt"]
    lines = [f"edge memory, {result['model']} ({result['spec']['quantization']}), history {prompt['history_tokens']} "
             f"tokens, response {prompt['response_tokens']}, budget {result['budget_mib']:.0f} MiB",
             "| batch | variant | generation batch | " + " | ".join(PHASES) + " | peak | fits |",
             "|---|---|---|" + "---|" * (len(PHASES) + 2)]
    key = "cuda_reserved_mib" if on_cuda else "rss_mib"
    for row in result["rows"]:
        s = row["setting"]
        variant = "lean" if s["lean_memory"] else "fused" if s.get("fused_loss") else "plain"
        head = f"| {s['batch_size']} | {variant} | {s['generation_batch_size']} | "
        if "failure" in row:
            lines.append(head + " | ".join("" for _ in PHASES) + f" | {row['failure']} | no |")
            continue
        peak = row.get("device_peak_mib", row["peak_mib"])
        lines.append(head + " | ".join(f"{row['phases'][p][key]:.0f}" for p in PHASES)
                     + f" | {peak:.0f} | {'yes' if row['fits_budget'] else 'no'} |")
    lines.append("MiB: " + ("CUDA memory reserved, the peak of each phase; peak adds the CUDA context"
                             if on_cuda else "the process's resident set, the peak of each phase"))
    return "\n".join(lines)
