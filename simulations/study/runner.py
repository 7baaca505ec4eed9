"""The study: NextQuill-Fed against every baseline and its own ablations, through the same
Flower apps, data, base and budget; one resumable command and a report.

    python -m simulations.study            (or `nextquill study`)
    python -m simulations.study --quick    (the real base, 4 users, one seed, one short round:
                                            about 10 minutes on 2 CPU cores, an empty data directory included)

Every (dataset, seed, method) cell is a federated run of the real ServerApp and ClientApp
with real Flower messages, in this process (`simulations.inprocess`: no SuperLink, no Ray,
the base resident once for all cells), except `nextquill-central`, which trains the same
losses on every user's data pooled on one machine (the non-private reference). Each cell's
result is written, atomically, as soon as it finishes (`<out>/cells/`); a rerun skips the
finished ones and resumes an interrupted one from its coordinator checkpoint, so a study
larger than one sitting runs in pieces. `simulations/study/report.py` turns the cells into
the report (tables with 95% intervals over seeds, CSV, plots).

The expert of a (dataset, seed) is the global adapter of its `fedit-context-sft` cell:
federated ContextSFT with the same budget, the paper's expert. Every method trains for the
same rounds × local steps × batch, every client in every round; all decode greedily.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from shared.paths import atomic_write_json, data_dir, ensure_folder
from shared.settings import SettingError
from simulations.datasets import GENERATED, dataset_name
from simulations.study.cells import data_profile, dce_detection, run_central_cell, run_federated_cell
from simulations.study.protocol import EXPERT_CELL, QUICK, STUDY_METHODS, StudyConfig, cell_path, run_config
from simulations.study.report import DCE_SUFFIX, PROFILE_SUFFIX, load_cells, machine

log = logging.getLogger("nextquill.study")
RESULTS = Path(__file__).parents[1] / "results"  # simulations/results: where the committed studies live


def cells(study: StudyConfig) -> list[tuple[str, int, str]]:
    """(dataset, seed, method) in running order: seed by seed (a study cut short still has every
    dataset at its first seeds), and a dataset's expert cells before the cells that need them."""
    found = []
    for seed in study.seeds:
        for dataset in study.datasets:
            rows = tuple(m for m in study.methods if STUDY_METHODS[m].datasets is None
                         or dataset_name(dataset) in STUDY_METHODS[m].datasets)
            experts = experts_of(rows)
            found += [(dataset, seed, method) for method in experts + [m for m in rows if m not in experts]]
    return found


def experts_of(methods: tuple[str, ...]) -> list[str]:
    """The rows among or needed by `methods` whose adapters are experts, the paper's first."""
    found = {STUDY_METHODS[m].expert for m in methods if STUDY_METHODS[m].needs_expert}
    found |= {m for m in methods if any(row.expert == m for row in STUDY_METHODS.values())}
    return sorted(found, key=lambda m: (m != EXPERT_CELL, list(STUDY_METHODS).index(m)))


def dce_path(out: Path, dataset: str, seed: int, expert: str) -> Path:
    """Where the DCE scores of the expert row `expert` go: beside its cell, `<row>.dce.json`."""
    return cell_path(out, dataset, seed, expert).with_name(f"{expert}{DCE_SUFFIX}")


def run_study(study: StudyConfig, out: Path, progress: bool = True) -> Path:
    """Run every cell not finished yet, then write the report; returns the report folder."""
    from tqdm.auto import tqdm

    from simulations.study.report import write_report

    out = Path(out)
    check_datasets(study.datasets)
    ensure_folder(out)
    recorded = out / "study.json"
    protocol = study.protocol()
    todo = cells(study)
    asked = [(dataset_name(dataset), seed, method) for dataset, seed, method in todo]
    if recorded.is_file():
        earlier = json.loads(recorded.read_text())
        different = sorted(k for k in protocol if earlier.get(k) != protocol[k])
        if different:
            raise ValueError(f"{out} holds a study with other settings ({', '.join(different)}); its cells would "
                             "not compare: choose another --out")
        asked = list(dict.fromkeys([*_asked_before(out, earlier, study), *asked]))
    atomic_write_json(recorded, {**protocol, "digest": study.digest, "cells": [list(c) for c in asked]})
    work = work_dir(study)
    experts = experts_of(study.methods)
    bar = tqdm(todo, desc="study cells", unit="cell", disable=not progress)
    for dataset, seed, method in bar:
        bar.set_postfix_str(f"{dataset_name(dataset)} seed {seed} {method}", refresh=True)
        path = cell_path(out, dataset, seed, method)
        expert = _expert_adapter(work, dataset, seed, method)
        config = run_config(study, dataset, seed, method, expert, work)
        if not path.is_file():
            if STUDY_METHODS[method].needs_expert:
                rebuild_lost_expert(out, study, dataset, seed, STUDY_METHODS[method].expert, work)
            started = time.perf_counter()
            if STUDY_METHODS[method].central:
                result = run_central_cell(config, study.users, expert)
            else:
                result = run_federated_cell(config, study.users)
            atomic_write_json(path, {"dataset": dataset_name(dataset), "seed": seed, "method": method,
                                     "wall_seconds": time.perf_counter() - started, "machine": machine(),
                                     "run_config": config.to_flower(), **result})
            log.info("%s seed %d %s: ROUGE-1 %.4f, NLL %.4f (%.0f s)", dataset_name(dataset), seed, method,
                     result["macro"].get("rouge1", float("nan")), result["macro"].get("nll", float("nan")),
                     time.perf_counter() - started)
        profile = cell_path(out, dataset, seed, "data").with_name(f"data{PROFILE_SUFFIX}")
        if not profile.is_file():
            atomic_write_json(profile, data_profile(config, study.users))
    # The experts' DCE scores after every cell (scoring four counterfactuals takes about as long
    # as a cell), so a sitting cut short keeps the rows that the headline pairs. Scored apart from
    # the cell, so a study folder whose scores predate a new one gets it when its <row>.dce.json
    # is removed and the study rerun.
    for dataset, seed, method in tqdm([cell for cell in todo if cell[2] in experts], desc="DCE scores", unit="expert",
                                      disable=not progress):
        scores = dce_path(out, dataset, seed, method)
        if not scores.is_file():
            config = run_config(study, dataset, seed, method, _expert_adapter(work, dataset, seed, method), work)
            detection = dce_detection(config, study.users, config.resolve(config.federation.run_dir) / "shared_adapter")
            atomic_write_json(scores, {"expert": method, **detection})
    return write_report(out, study, STUDY_METHODS, planned=len(asked))


def _expert_adapter(work: Path, dataset: str, seed: int, method: str) -> Path:
    """Where the expert of a cell lies: the global adapter of the row that `method` names."""
    return work / "runs" / dataset_name(dataset) / f"seed-{seed}" / STUDY_METHODS[method].expert / "shared_adapter"


def check_datasets(datasets: tuple[str, ...]) -> None:
    """Before anything is written: every dataset file reads as LaMP-style JSON (the error names
    the file and the record or line at fault), and no two datasets are the same records."""
    from simulations.datasets.lamp import read_lamp_json

    names: dict[str, str] = {}
    for dataset in datasets:
        if dataset not in GENERATED:
            read_lamp_json(dataset)
        name = dataset_name(dataset)
        if name in names:
            raise ValueError(f"--datasets {names[name]} and {dataset} hold the same records ({name}): give it once")
        names[name] = dataset


def _asked_before(out: Path, recorded: dict[str, Any], study: StudyConfig) -> list[tuple[str, int, str]]:
    """The cells the earlier runs into the study folder `out` asked for: those its `study.json`
    lists and those finished. (Before it listed them, `study.json` held the last run's datasets,
    methods and seeds.)"""
    asked = [(dataset, seed, method) for dataset, seed, method in recorded.get("cells", [])]
    methods = tuple(m for m in recorded.get("methods", ()) if m in STUDY_METHODS)
    if methods:
        last = dataclasses.replace(study, datasets=tuple(recorded.get("datasets", study.datasets)), methods=methods,
                                   seeds=tuple(recorded.get("seeds", study.seeds)))
        asked += [(dataset_name(dataset), seed, method) for dataset, seed, method in cells(last)]
    return asked + [(cell["dataset"], cell["seed"], cell["method"]) for cell in load_cells(out)]


def rebuild_lost_expert(out: Path, study: StudyConfig, dataset: str, seed: int, expert_row: str, work: Path) -> None:
    """Run `expert_row`'s cell again for its adapter when the cell is recorded but its run folder
    is gone (the study resumed from a fresh clone, on another machine, or after the data
    directory was cleaned), so that the cells still to run train with the same expert as those
    before them. The recorded cell is kept; a rebuilt expert that scores otherwise is reported."""
    recorded = cell_path(out, dataset, seed, expert_row)
    config = run_config(study, dataset, seed, expert_row, None, work)
    if not recorded.is_file() or (config.resolve(config.federation.run_dir) / "shared_adapter").is_dir():
        return
    log.info("%s seed %d: rebuilding the expert %s (its cell is recorded, its run folder is gone)",
             dataset_name(dataset), seed, expert_row)
    rebuilt = run_federated_cell(config, study.users)["macro"]
    before = json.loads(recorded.read_text())["macro"]
    differs = sorted(k for k in before if k in rebuilt and not _same_score(before[k], rebuilt[k]))
    if differs:
        log.warning("the rebuilt expert %s of %s seed %d scores otherwise than its recorded cell (%s): the cells "
                    "still to run use the rebuilt one", expert_row, dataset_name(dataset), seed, ", ".join(differs))


def _same_score(a: float, b: float) -> bool:
    # Equal up to float rounding: the held-out NLL has been summed in other orders across versions.
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))


def work_dir(study: StudyConfig) -> Path:
    """The study's users and run folders in the data directory: they depend on the protocol,
    not on which rows or seeds are asked."""
    return data_dir() / "study" / study.digest


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from simulations.options import add_settings

    parser = parser or argparse.ArgumentParser(prog="python -m simulations.study", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"the quick size ({', '.join(f'{k}={v}' for k, v in QUICK.items())}): the real base, "
                             "which needs no training (converted from its wheel once, about a minute), and one short "
                             "round; about 10 minutes on 2 CPU cores from an empty data directory (9 min 40 s "
                             "measured: six federated cells of about a minute and the DCE detection of four "
                             "counterfactuals, 4.5 minutes)")
    parser.add_argument("--out", help="the study folder: cells and report (default: simulations/results/"
                                      "study-<model> in this checkout, or study-quick with --quick)")
    add_settings(parser, StudyConfig())
    return parser


def study_from(args: argparse.Namespace) -> tuple[StudyConfig, Path]:
    from simulations.options import settings_from

    study = settings_from(args, StudyConfig())
    if any(not d.strip() for d in study.datasets):
        raise ValueError("--datasets holds an empty name: give a dataset name or the path of a LaMP-style JSON file")
    # Dataset files as absolute paths: the devices resolve relative ones under the data directory.
    files = tuple(d if d in GENERATED else str(Path(d).expanduser().resolve()) for d in study.datasets)
    try:
        study = dataclasses.replace(study, datasets=files)
    except SettingError as error:  # ./a.json and a.json: one file
        raise error.renamed("--datasets") from None
    if args.quick:
        study = dataclasses.replace(study, **QUICK)
    default = RESULTS / ("study-quick" if args.quick else f"study-{study.model}")
    return study, Path(args.out) if args.out else default


def main(argv: list[str] | None = None) -> int:
    from simulations.options import run_command

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    study, out = study_from(args)
    return run_command("study", lambda: print(f"report: {run_study(study, out) / 'report.md'}") or 0)


if __name__ == "__main__":
    sys.exit(main())
