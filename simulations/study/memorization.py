"""Memorization: how much a federated run memorizes a secret of one user, as the exposure of a
canary (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary, "my locker code is" followed by random digits, is added to one user's training
targets (`insertions` times, in that user's own contexts). The run is the study's federated
run of a method (default `nextquill-fed`, and with differential privacy `dp-eps-8`; `feddpa`,
the same split with plain cross-entropy, on request), expert phase included. Afterwards the
canary's log-likelihood, given the user's prompt, is ranked among `candidates` random codes
of the same format, under two models:

  shared      the base with the aggregated shared adapter only: what the coordinator holds,
              and every other user receives;
  personal    the base with the shared and that user's personal adapter: what stays on the
              user's device.

Exposure = log2(candidates + 1) − log2(rank), rank 1 being the canary most likely of all; it
is at most log2(candidates + 1) (about 10 bits for 1,000), and 1/ln 2 ≈ 1.4 bits on average
when the canary ranks like a random code (Carlini's estimate by sampling, without the
extrapolation).

Each (method, seed, canary copies, candidates, protocol) is a cell saved as it finishes; a rerun
skips finished cells. The protocol (the study's budget: rounds, local steps, batch, learning
rate...) is part of a cell's name, so a positive control at a larger budget never reads a cell
of the study's budget.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import torch

from shared.paths import atomic_write_json, atomic_write_text
from shared.prompts import encode_sample
from shared.user_store import CORE_META, Sample, UserStore, write_user_store

log = logging.getLogger(__name__)

CANARY_PREFIX = "my locker code is "
CANARY_DIGITS = 6
METHODS = ("nextquill-fed", "dp-eps-8")
# Every study row on the dual split (the personalized model is shared + personal adapter):
# `feddpa` trains the same split with plain cross-entropy, the control for NextQuill's weights.
CHOICES = ("nextquill-fed", "dp-eps-8", "feddpa")


def random_code(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(CANARY_DIGITS))


def insert_canary(store: UserStore, canary: str, insertions: int) -> UserStore:
    """Rewrite `store` with `insertions` more training samples whose target is `canary`, each in
    the context (input and history) of one of the user's training samples."""
    train = store.samples("train")
    if not train:
        raise ValueError(f"user store {store.path} has no training samples to put a canary beside")
    added = [dataclasses.replace(train[i % len(train)], id=f"canary-{i}", y=canary, preference_spans=())
             for i in range(insertions)]
    history = store.history()
    extra = {k: v for k, v in store.meta.items() if k not in CORE_META}
    return write_user_store(store.path, store.user_id, store.meta["source"], store.samples() + added, history,
                            extra_meta=extra or None, overwrite=True)


def exposure(canary_nll: float, candidate_nlls: list[float]) -> tuple[float, int]:
    """(exposure in bits, rank) of the canary among the candidates, by total NLL (lower: more
    likely); a tie counts against the canary."""
    rank = 1 + sum(nll <= canary_nll for nll in candidate_nlls)
    return math.log2(len(candidate_nlls) + 1) - math.log2(rank), rank


@torch.no_grad()
def sequence_nlls(model: torch.nn.Module, device: Any, sample: Sample, history: list[str], targets: list[str],
                  batch_size: int = 32) -> list[float]:
    """Total NLL (nats) of each target given the sample's input and the user's history."""
    from shared.batching import collate
    from shared.forward import model_device, response_token_nll

    model.eval()
    totals = []
    for start in range(0, len(targets), batch_size):
        encoded = [encode_sample(device.tokenizer, sample.x, history, target, device.prompt)
                   for target in targets[start : start + batch_size]]
        batch = collate(encoded, device.tokenizer.pad_token_id).to(model_device(model))
        totals += response_token_nll(model, batch).sum(dim=1).tolist()
    return totals


def measure(model: torch.nn.Module, device: Any, store: UserStore, canary: str, candidates: list[str]) -> dict:
    """The canary's exposure under `model` (as it is activated), in the context of the user's
    first canary sample."""
    sample = next(s for s in store.samples("train") if s.id == "canary-0")
    history = [item.text for item in store.history_for(sample)]
    nlls = sequence_nlls(model, device, sample, history, [canary, *candidates])
    bits, rank = exposure(nlls[0], nlls[1:])
    return {"exposure_bits": bits, "rank": rank, "canary_nll": nlls[0],
            "candidate_nll_median": sorted(nlls[1:])[len(candidates) // 2]}


def run_cell(study: Any, method: str, seed: int, work: Path, insertions: int, candidates: int) -> dict[str, Any]:
    """One federated run with a canary in user 0's targets; its exposure under the shared
    adapter and under user 0's personalized model."""
    from client import federated
    from client.client_app import app as client_app
    from coordinator.checkpoint import load_checkpoint
    from coordinator.federation import run_federation
    from shared.run_config import RunConfig
    from shared.split import PERSONAL_ADAPTER
    from simulations.datasets.simulated import simulated_user_stores
    from simulations.inprocess import InProcessGrid
    from simulations.study.protocol import run_config

    cell_work = work / method / f"seed-{seed}"
    values = run_config(study, "reviewers", seed, method, None, cell_work).to_flower()
    values.update({"expert.adapter": "", "expert.rounds": study.rounds, "evaluate.every": 0})
    config = RunConfig.from_flower(values)
    rng = random.Random(f"canary-{seed}")
    canary = CANARY_PREFIX + random_code(rng)
    others = [CANARY_PREFIX + random_code(rng) for _ in range(candidates)]
    paths = simulated_user_stores(config, study.users)[: study.users]
    store = UserStore.open(paths[0])
    if not any(s.id == "canary-0" for s in store.samples()):
        store = insert_canary(store, canary, insertions)
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": study.users}
                                      for i in range(study.users)], config.to_flower())
    result = run_federation(grid, config)
    checkpoint = load_checkpoint(config.resolve(config.federation.run_dir))
    device = federated.resident_device(config)
    split = config.sharing.spec
    if split.kind != "dual":
        raise ValueError(f"memorization is measured on the dual split, {method!r} uses {split.kind!r}")
    model = federated.build_adapters(device, store, split, checkpoint.shared,
                                     f"{checkpoint.run_id}-personalize", seed)
    device.host.activate(*[a for a in split.adapters if a != PERSONAL_ADAPTER])
    shared = measure(model, device, store, canary, others)
    device.host.activate(*split.adapters)
    personal = measure(model, device, store, canary, others)
    return {"method": method, "seed": seed, "insertions": insertions, "candidates": candidates,
            "budget": {"rounds": study.rounds, "local_steps": study.local_steps, "batch_size": study.batch_size,
                       "learning_rate": study.learning_rate},
            "max_exposure_bits": math.log2(candidates + 1), "shared": shared, "personal": personal,
            "privacy": (result.summary or {}).get("privacy"),
            "rouge1": (result.summary or {}).get("macro_average", {}).get("eval-rouge1")}


def run_memorization(study: Any, out: Path, methods: tuple[str, ...] = METHODS, insertions: int = 4,
                     candidates: int = 1000) -> list[dict[str, Any]]:
    """Every (method, seed) cell of `study`'s seeds, resumable; writes `memorization.json` and
    `memorization.md` under `out`."""
    from tqdm.auto import tqdm

    from simulations.study.runner import work_dir

    work = work_dir(study) / f"memorization-{insertions}x{candidates}"
    protocol = work_dir(study).name
    rows = []
    todo = [(method, seed) for seed in study.seeds for method in methods]
    for method, seed in tqdm(todo, desc="memorization cells", unit="cell"):
        path = out / "cells" / f"{method}-seed-{seed}-{insertions}x{candidates}-{protocol}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
            continue
        rows.append(run_cell(study, method, seed, work, insertions, candidates))
        atomic_write_json(path, rows[-1])
    # The table holds every cell measured so far, of any canary count or budget (a positive control).
    measured = [json.loads(path.read_text()) for path in sorted((out / "cells").glob("*.json"))]
    measured.sort(key=lambda row: (_steps(row), row["insertions"], row["method"] != "nextquill-fed", row["method"],
                                   row["seed"]))
    atomic_write_json(out / "memorization.json", measured)
    atomic_write_text(out / "memorization.md", memorization_table(measured) + "\n")
    return rows


def _steps(row: dict[str, Any]) -> int:
    """Local steps a user trains in the whole personalization phase."""
    return row["budget"]["rounds"] * row["budget"]["local_steps"]


def memorization_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | budget: rounds × local steps × batch, lr | canary copies | seed | ε | "
             "exposure, shared adapter (bits) | exposure, personalized (bits) | rank shared / personal | ROUGE-1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        epsilon = (row.get("privacy") or {}).get("epsilon")
        rouge = "-" if row.get("rouge1") is None else f"{row['rouge1']:.3f}"
        spent = "∞" if epsilon is None else f"{epsilon:.3g}"
        budget = row["budget"]
        lines.append(
            f"| `{row['method']}` | {budget['rounds']} × {budget['local_steps']} × {budget['batch_size']}, "
            f"{budget['learning_rate']:g} | {row['insertions']} | {row['seed']} | {spent} | "
            f"{row['shared']['exposure_bits']:.2f} | {row['personal']['exposure_bits']:.2f} | "
            f"{row['shared']['rank']} / {row['personal']['rank']} | {rouge} |")
    maximum = rows[0]["max_exposure_bits"] if rows else 0.0
    return "\n".join(lines) + (f"\n\nExposure is at most {maximum:.2f} bits ({rows[0]['candidates']} candidates); "
                               f"a canary that ranks like a random code scores 1.4 bits on average." if rows else "")


def main(argv: list[str] | None = None) -> int:
    from simulations.options import run_command, whole_number
    from simulations.study.runner import build_parser, study_from

    parser = build_parser()
    parser.prog = "python -m simulations.study.memorization"
    parser.description = __doc__
    parser.add_argument("--insertions", type=whole_number(1), default=4,
                        help="copies of the canary in the user's targets")
    parser.add_argument("--candidates", type=whole_number(1), default=1000,
                        help="random codes the canary is ranked among")
    parser.add_argument("--memorization-methods", nargs="+", default=list(METHODS), choices=list(CHOICES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    study, out = study_from(args)

    def measure_all() -> int:
        rows = run_memorization(study, out / "memorization", tuple(args.memorization_methods), args.insertions,
                                args.candidates)
        print(memorization_table(rows))
        return 0

    return run_command("memorization", measure_all)


if __name__ == "__main__":
    raise SystemExit(main())
