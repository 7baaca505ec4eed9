"""Benchmark 7, a deployed device's set-up per message. Flower starts a fresh ClientApp process
for every message (`flwr-clientapp` runs one task and exits, in either isolation mode), so a
deployed device imports the app and loads its 4-bit base before every round's training.

Measured as Flower pays it, in fresh processes: the ClientApp's imports, then the base loaded
as a device loads it (`Device.load`), in two modes in the same invocation:

  quantize on load   the base's weights read and quantized to NF4 by bitsandbytes (what every
                     message paid before the quantized copy, `quantized-cache=false`);
  quantized copy     the copy kept in the data directory read instead (`quantized-cache=true`,
                     the default).

Each figure is the median over `repeats` processes, after an untimed first process per mode
(it warms the disk cache and, with the copy on, makes the copy).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from shared.paths import DATA_DIR_ENV, atomic_write_json

REPO = Path(__file__).parents[2]
PROBE = """
import json, sys, time
started = time.perf_counter()
from client.client_app import app  # what a ClientApp process imports
imported = time.perf_counter()
from client.device import Device
from shared.config import BaseSpec, LoraSettings, PromptConfig
Device.load(BaseSpec(**json.loads(sys.argv[1])), LoraSettings(), PromptConfig())
print(json.dumps({"import_seconds": imported - started, "load_seconds": time.perf_counter() - imported}))
"""
MODES = {"quantize on load": False, "quantized copy": True}


def _probe(spec: dict, home: Path) -> dict:
    """One fresh process: its import and base-load seconds."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, DATA_DIR_ENV: str(home)}, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the set-up probe failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reload_benchmark(model: str, model_dir: Path, device: str, repeats: int, out: Path) -> dict:
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as scratch:
        home = Path(scratch)
        for name, cached in MODES.items():
            spec = {"model": str(model_dir), "quantization": "nf4", "device": device, "quantized_cache": cached}
            _probe(spec, home)  # untimed: warms the disk cache, and with the copy on, makes the copy
            probes = [_probe(spec, home) for _ in range(repeats)]
            row = {"mode": name, **{key: statistics.median(p[key] for p in probes)
                                    for key in ("import_seconds", "load_seconds")}, "probes": probes}
            row["setup_seconds"] = row["import_seconds"] + row["load_seconds"]
            rows.append(row)
            print(f"{name}: import {row['import_seconds']:.2f} s, base {row['load_seconds']:.2f} s", flush=True)
    for row in rows:
        row["setup_vs_quantize_on_load"] = row["setup_seconds"] / rows[0]["setup_seconds"]
        row["load_vs_quantize_on_load"] = row["load_seconds"] / rows[0]["load_seconds"]
    result = {"benchmark": "device set-up per message", "model": model, "device": device, "repeats": repeats,
              "machine": platform.machine(), "rows": rows}
    atomic_write_json(out, result)
    print(reload_table(result))
    return result


def reload_table(result: dict) -> str:
    lines = [f"a deployed device's set-up per message, {result['model']} in 4-bit on {result['device']} "
             f"(median of {result['repeats']} fresh processes)",
             "| base | imports (s) | base load (s) | set-up (s) | × quantize on load |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['mode']} | {row['import_seconds']:.2f} | {row['load_seconds']:.2f} | "
                     f"{row['setup_seconds']:.2f} | {row['setup_vs_quantize_on_load']:.2f} |")
    return "\n".join(lines)
