"""Benchmark 1, the local step: seconds per step, tokens per second and peak memory of one
NextQuill step (plain, and with the lean two-stage backward) against one ContextSFT step on
the same batch (same 4-bit base, same LoRA), and against a faithful re-implementation of the
authors' loss computation (their released train.py): full-vocabulary logits and softmax at every position of both passes
(the no-history input padded to the with-history length, as their data is), token
weights from the model being trained, recomputed every step.

Each method runs in a process of its own, so that its peak memory is its own: on CUDA the
peak allocated bytes above what the model and optimizer hold before the first step; on the
CPU the peak resident set above the same point (ru_maxrss).

On CUDA it also reports model FLOP utilization: the floating-point operations of one step,
forward and backward, as PyTorch's FlopCounterMode counts them (matrix products and
attention, the dequantized 4-bit products included), per second, over this GPU's bf16
matrix-product rate measured in the same run (8192^3 products).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from queue import Empty

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from client.trainer import choose_step
from shared.adapters import AdapterHost
from shared.batching import PairBatch, collate
from shared.config import BaseSpec, LoraSettings, TrainConfig, WeightScheme
from shared.forward import compiled_decoder_layers, compute_autocast, model_device
from shared.loading import load_causal_lm
from shared.losses import IGNORE_INDEX, nextquill_loss, token_weights
from shared.paths import atomic_write_json, atomic_write_text
from shared.prompts import EncodedSample
from simulations.benchmarks.model_shapes import QWEN_SHAPE, model_dir_for

log = logging.getLogger(__name__)

# nextquill: two forwards (the default); nextquill-paired: both passes in one forward
# (`train.paired-pass`); nextquill-lean: the two-stage backward (`train.lean-memory`); nextquill-fused: the
# LM head applied inside the loss, a chunk of tokens at a time (`train.fused-loss`); *-compiled: the
# decoder layers through torch.compile (`train.compile-layers`), asked for by name (compiling takes
# tens of seconds per process).
METHODS = ("context-sft", "nextquill", "nextquill-paired", "nextquill-lean", "nextquill-fused", "authors")
COMPILED = ("context-sft-compiled", "nextquill-compiled")
RATIOS = (("nextquill", "context-sft"), ("nextquill-paired", "context-sft"), ("nextquill-lean", "context-sft"),
          ("nextquill-fused", "context-sft"), ("nextquill-paired", "nextquill"), ("nextquill-fused", "nextquill"),
          ("authors", "nextquill"), ("nextquill-compiled", "context-sft-compiled"),
          ("nextquill-compiled", "context-sft"), ("nextquill-compiled", "nextquill"),
          ("context-sft-compiled", "context-sft"))


def step_config(method: str) -> TrainConfig:
    """The training settings a benchmark method name stands for (`authors` steps on its own
    loss, with NextQuill's alpha and weights)."""
    name = method.removesuffix("-compiled")
    return TrainConfig(method=name if name in ("context-sft", "nextquill") else "nextquill",
                       lean_memory=name == "nextquill-lean", paired_pass=name == "nextquill-paired",
                       fused_loss=name == "nextquill-fused", compile_layers=method.endswith("-compiled"))

@dataclass(frozen=True)
class StepShape:
    """The batch every method steps on."""

    batch_size: int = 4
    history_tokens: int = 160  # prompt with history (x, h)
    context_tokens: int = 48  # prompt without history (x only)
    response_tokens: int = 48


def random_batch(vocab_size: int, shape: StepShape, seed: int = 0) -> tuple[list[EncodedSample], torch.Tensor]:
    """Encoded samples of random tokens with the given lengths, and random expert
    probabilities [B, R] of their response tokens (pairs: with, without)."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(10, vocab_size, (n,), generator=generator).tolist()

    samples = []
    for _ in range(shape.batch_size):
        context, history, response = ids(shape.context_tokens), ids(shape.history_tokens), ids(shape.response_tokens)
        samples.append(EncodedSample(prompt_with=history + context, prompt_without=context, response=response))
    probs = torch.rand((2, shape.batch_size, shape.response_tokens), generator=generator)
    return samples, probs


def authors_step_loss(model: torch.nn.Module, batch: PairBatch, alpha: float, scheme: WeightScheme) -> torch.Tensor:
    """The authors' computation: both passes at full length with full-vocabulary logits at
    every position; weights from the softmax of the model being trained, every step; the
    weighted next-token loss plus alpha times the unweighted alignment loss."""
    with_side = batch.with_history
    width = with_side.input_ids.shape[1]
    without = batch.without_history
    pad = width - without.input_ids.shape[1]
    # Their no-history input is padded to the with-history length (the labels are shared).
    without_ids = F.pad(without.input_ids, (pad, 0), value=0)
    without_mask = F.pad(without.attention_mask, (pad, 0), value=0)
    # Same mixed precision as ours; float32 logits, as the transformers of their release returned.
    with compute_autocast(model):
        logits0 = model(input_ids=with_side.input_ids, attention_mask=with_side.attention_mask,
                        use_cache=False).logits.float()
        logits1 = model(input_ids=without_ids, attention_mask=without_mask, use_cache=False).logits.float()
    labels = torch.full(with_side.input_ids.shape, IGNORE_INDEX, dtype=torch.long, device=logits0.device)
    labels[:, -batch.response_length :] = batch.labels
    vocab = logits0.shape[-1]
    shift0 = logits0[..., :-1, :].contiguous().view(-1, vocab)
    shift1 = logits1[..., :-1, :].contiguous().view(-1, vocab)
    shift_labels = labels[..., 1:].contiguous().view(-1)
    probs0, probs1 = F.softmax(shift0, dim=-1), F.softmax(shift1, dim=-1)
    rows = torch.arange(shift_labels.shape[0], device=shift0.device)
    safe = shift_labels.clamp_min(0)
    weights = token_weights(scheme, probs0[rows, safe].detach(), probs1[rows, safe].detach())
    _, l_n, _ = nextquill_loss(shift0, None, shift_labels, weights, alpha=0.0)
    l_p = F.cross_entropy(shift0 - shift1, shift_labels)
    return l_n + alpha * l_p


def _run_method(model_dir: str, spec: BaseSpec, method: str, shape: StepShape, steps: int, out,
                profile_dir: str | None = None) -> None:
    """In a child process: load, step `steps` times after one warm-up step, report."""
    torch.manual_seed(0)
    base = load_causal_lm(Path(model_dir), spec)
    host = AdapterHost(base, LoraSettings())
    model = host.new("bench", seed=0)
    device = model_device(model)
    samples, probs = random_batch(base.config.vocab_size, shape)
    batch = collate(samples, pad_id=0).to(device)
    expert = (probs[0].to(device), probs[1].to(device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    config = step_config(method)
    training_step = choose_step(config, model)
    model.train()

    def step() -> None:
        if method == "authors":
            authors_step_loss(model, batch, config.alpha, config.weight_scheme).backward()
        else:
            training_step(batch, expert if config.needs_expert else None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    baseline_rss = _rss_now_bytes()
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        baseline_cuda = torch.cuda.memory_allocated(device)
    with compiled_decoder_layers(model) if config.compile_layers else contextlib.nullcontext():
        started = time.perf_counter()
        step()  # warm-up: allocator, kernels, bitsandbytes' first-call work, compiling
        sync()
        warmup_seconds = time.perf_counter() - started
        seconds = []
        for _ in range(steps):
            sync()
            started = time.perf_counter()
            step()
            sync()
            seconds.append(time.perf_counter() - started)
        if profile_dir:
            _profile(step, sync, Path(profile_dir) / f"profile-{method}.txt")
    # Read before the FLOP count's step, which runs eagerly.
    peak_memory = (torch.cuda.max_memory_allocated(device) - baseline_cuda) if device.type == "cuda" \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss
    tokens = sum(len(s.prompt_with) + len(s.response) for s in samples)
    flops = None
    if device.type == "cuda":
        # Counted on the math attention path: the counter has no formula for the fused
        # kernels with grouped key/value heads; the math path does the same products.
        # Eagerly: the counter sees the operators dispatched, which compiled kernels are not.
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    result = {
        "flops_per_step": flops,
        "method": method, "seconds_per_step": statistics.median(seconds), "seconds": seconds,
        "warmup_seconds": warmup_seconds,
        "tokens_per_second": tokens / statistics.median(seconds),
        "peak_memory_bytes": peak_memory,
        "memory_kind": "CUDA allocated above model + optimizer" if device.type == "cuda"
        else "resident set above model + optimizer (ru_maxrss)",
    }
    out.put(result)


def _profile(step, sync, path: Path, steps: int = 3) -> None:
    """PyTorch profiler over `steps` steps: the operators' table by device and CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    averages = prof.key_averages()
    tables = [f"# {path.stem}, {steps} steps"]
    if torch.cuda.is_available():
        tables += ["## by device time", averages.table(sort_by="self_device_time_total", row_limit=25)]
    tables += ["## by CPU time", averages.table(sort_by="self_cpu_time_total", row_limit=25)]
    atomic_write_text(path, "\n".join(tables) + "\n")


def _in_child(model_dir: str, spec: BaseSpec, method: str, shape: StepShape, steps: int, cpu_memory: bool,
              profile_dir: str | None = None) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    saved = os.environ.get(_MMAP_THRESHOLD)
    if cpu_memory:
        os.environ[_MMAP_THRESHOLD] = "65536"  # read by the child's C library at start
    try:
        child = context.Process(target=_run_method, args=(model_dir, spec, method, shape, steps, queue, profile_dir))
        child.start()
    finally:
        if saved is None:
            os.environ.pop(_MMAP_THRESHOLD, None)
        else:
            os.environ[_MMAP_THRESHOLD] = saved
    # A child that dies (out of memory, a crash) never reports: poll, so that this says so.
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not child.is_alive():
                raise RuntimeError(f"the {method} step process died (exit code {child.exitcode}); "
                                   "out of memory is the usual cause at large shapes") from None
    child.join()
    return result


_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def bf16_matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    """This GPU's measured bf16 matrix-product rate (random data, after warm-up)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 2 * size**3 * repeats / (start.elapsed_time(end) / 1000) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return tflops


def step_benchmark(model: str, spec: BaseSpec, shape: StepShape, steps: int, out: Path,
                   methods: tuple[str, ...] = METHODS, profile_dir: Path | None = None) -> dict:
    """Time (and, with `profile_dir`, profile) each method; write the result to `out`."""
    model_dir = model_dir_for(model)
    on_cuda = spec.device != "cpu" and torch.cuda.is_available()
    peak_tflops = bf16_matmul_tflops() if on_cuda else None
    rows = []
    for method in methods:
        row = _in_child(str(model_dir), spec, method, shape, steps, cpu_memory=False,
                        profile_dir=str(profile_dir) if profile_dir else None)
        if not on_cuda:
            # A second process measures the CPU peak: large blocks straight from mmap and returned
            # on free make the resident set follow the live tensors (its peak is the step's, not
            # the allocator's high-water mark), at a cost in speed the timed process does not pay.
            row["peak_memory_bytes"] = _in_child(str(model_dir), spec, method, shape, 1,
                                                 cpu_memory=True)["peak_memory_bytes"]
        if peak_tflops and row["flops_per_step"]:
            row["mfu"] = row["flops_per_step"] / row["seconds_per_step"] / (peak_tflops * 1e12)
        rows.append(row)
        log.info("%s: %.3f s/step, peak %.0f MiB", method, row["seconds_per_step"], row["peak_memory_bytes"] / 2**20)
    by_method = {row["method"]: row for row in rows}
    ratios = {}
    for numerator, denominator in RATIOS:
        if {numerator, denominator} <= set(by_method):
            name = f"{numerator}_over_{denominator}".replace("-", "_")
            top, bottom = by_method[numerator], by_method[denominator]
            ratios[f"{name}_time"] = top["seconds_per_step"] / bottom["seconds_per_step"]
            ratios[f"{name}_memory"] = top["peak_memory_bytes"] / max(1, bottom["peak_memory_bytes"])
    result = {
        "benchmark": "local step", "model": model, "spec": asdict(spec), "shape": asdict(shape), "steps": steps,
        "machine": _machine(), "software": _software(), "bf16_matmul_tflops": peak_tflops,
        "rows": rows, "ratios": ratios,
    }
    atomic_write_json(out, result)
    print(step_table(result))
    return result


def step_table(result: dict) -> str:
    lines = [f"local step, {result['model']} ({result['spec']['quantization']}), batch {json.dumps(result['shape'])}, "
             f"{result['machine']}"]
    mfu = result.get("bf16_matmul_tflops") is not None
    if mfu:
        lines.append(f"measured bf16 matrix-product rate: {result['bf16_matmul_tflops']:.0f} TFLOP/s")
    lines += ["| method | s/step | tokens/s | peak memory (MiB) | warm-up step (s) |"
              + (" TFLOP/step | MFU |" if mfu else ""),
              "|---|---|---|---|---|" + ("---|---|" if mfu else "")]
    for row in result["rows"]:
        warmup = f"{row['warmup_seconds']:.1f}" if "warmup_seconds" in row else ""
        line = (f"| {row['method']} | {row['seconds_per_step']:.3f} | {row['tokens_per_second']:.0f} | "
                f"{row['peak_memory_bytes'] / 2**20:.0f} | {warmup} |")
        if mfu:
            line += f" {row['flops_per_step'] / 1e12:.2f} | {row.get('mfu', 0):.1%} |"
        lines.append(line)
    lines += [f"{name}: {value:.2f}x" for name, value in result["ratios"].items()]
    return "\n".join(lines)


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_description()}, {torch.get_num_threads()} threads"


_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> str:
    """The CPU's model name and the flags that decide its float32 / bfloat16 speed (CPU timings
    differ from machine to machine; a figure names the CPU it was taken on)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    present = [flag for flag in _CPU_FLAGS if flag in flags]
    return f"{name} (flags: {' '.join(present) or 'none of ' + ', '.join(_CPU_FLAGS)})"


def _software() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "cuda": str(torch.version.cuda), "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def default_shape(model: str) -> StepShape:
    if model == QWEN_SHAPE:
        return StepShape(batch_size=1, history_tokens=2048, context_tokens=64, response_tokens=128)
    return StepShape()


def with_overrides(shape: StepShape, **values: int | None) -> StepShape:
    return replace(shape, **{k: v for k, v in values.items() if v is not None})
