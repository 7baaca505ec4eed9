"""Benchmark 3, communication: the bytes a client uploads per round (its reply's ArrayRecord,
packed and serialized as Flower sends it; what crosses the wire, requests included: benchmark
`wire`) for each shared / personal split and transport dtype,
against FedAvg of the full LoRA in float32. Every method trains the same LoRA shape, so the
bytes depend on the split and dtype only; the download is the same record."""

from __future__ import annotations

from pathlib import Path

from coordinator.global_adapters import GlobalAdapters
from shared.config import TRANSPORT_DTYPES, LoraSettings
from shared.loading import resolve_model_dir
from shared.paths import atomic_write_json
from shared.split import SplitSpec
from shared.wire import SharedLayout


def comm_benchmark(model: str, lora: LoraSettings, out: Path, model_dir: Path | None = None) -> dict:
    adapters = GlobalAdapters(str(model_dir or resolve_model_dir(model)), lora)
    layers = adapters.host.base.config.num_hidden_layers
    splits = [SplitSpec("full"), SplitSpec("dual"), SplitSpec("a-shared"), SplitSpec("layers", max(1, layers // 2))]
    rows = []
    for split in splits:
        shared = adapters.initial_shared(split, seed=0)
        for dtype in TRANSPORT_DTYPES:
            rows.append({
                "split": split.kind if split.kind != "layers" else f"layers ({split.shared_layers} of {layers})",
                "transport_dtype": dtype, "parameters": sum(v.numel() for v in shared.values()),
                "upload_bytes": SharedLayout.of(shared).encode(shared, dtype).count_bytes(),
            })
    baseline = next(r for r in rows if r["split"] == "full" and r["transport_dtype"] == "float32")["upload_bytes"]
    for row in rows:
        row["over_full_lora_fedavg"] = row["upload_bytes"] / baseline
    result = {"benchmark": "communication", "model": model, "lora": {"r": lora.lora_r, "alpha": lora.lora_alpha,
              "target_modules": list(lora.target_modules)}, "rows": rows}
    atomic_write_json(out, result)
    print(comm_table(result))
    return result


def comm_table(result: dict) -> str:
    lines = [f"upload per client per round, {result['model']}, LoRA r={result['lora']['r']}",
             "| split | dtype | shared parameters | bytes | vs full-LoRA FedAvg (fp32) |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['split']} | {row['transport_dtype']} | {row['parameters']:,} | {row['upload_bytes']:,} | "
                     f"{row['over_full_lora_fedavg']:.2f} |")
    return "\n".join(lines)
