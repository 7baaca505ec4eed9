"""Choosing NextQuill's own settings on a validation split, never on the test split.

For one (dataset, seed) of the study, copies of its users are made without their test samples,
each user's latest `held-out` training samples becoming the validation split (the held-out
samples the evaluation scores). On those users the study's expert (`fedit-context-sft`) and
fair baseline (`feddpa`) are trained as the study trains them, then `nextquill-fed` once per
candidate: every combination of the values of `--grid`. The choice is the deployable
candidate with the highest validation ROUGE-1 (ties: the lower NLL); every candidate is also
paired, user by user, against `feddpa` on the same validation samples, with a 95% bootstrap
interval, so the report says whether any setting beats the baseline before the test split is
looked at.

    python -m simulations.study.tune                        (reviewers, seed 0, the default grid)
    python -m simulations.study.tune --grid weights.weight-low=0.1,0.5 train.alpha=0,0.1 --dataset chitchat

The budgets, users and base are the study's (`--rounds`, `--users`... as `python -m
simulations.study` takes them). Each cell is written as it finishes and a rerun skips it; the
report (`report.md`, `tune.csv`, `tune.png`) is rewritten from every cell of the folder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from shared.paths import atomic_write_json, atomic_write_png, atomic_write_text, ensure_folder
from shared.run_config import RunConfig, run_config_keys, upgrade_keys
from shared.user_store import CORE_META, UserStore, write_user_store
from simulations.datasets import GENERATED, dataset_name
from simulations.options import whole_number

log = logging.getLogger(__name__)

OURS = "nextquill-fed"
BASELINE = "feddpa"
EXPERT = "fedit-context-sft"
# NextQuill's own settings: what the grid may vary. The budget (steps, learning rate) is the
# study's and the baseline's; tuning it for one row only would not be a fair comparison.
GRID_KEYS = ("weights.dce-reference", "train.mce-reference", "weights.weighting", "weights.delta",
             "weights.weight-high", "weights.weight-low", "weights.keep-fraction", "train.alpha")
DEFAULT_GRID = ("weights.dce-reference=removed,generic", "weights.weight-low=0.1,0.5")
SIMULATION_ONLY = {"weights.dce-reference": "donors", "train.mce-reference": "donors"}
TABLE_METRICS = ("rouge1", "nll", "history-sensitivity", "style-f1", "content-recall")


def parse_grid(specs: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """`key=v1,v2 ...` -> every combination, as run config values of the keys' types."""
    known = run_config_keys()
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid entry {spec!r}: expected key=value[,value...]")
        if key not in GRID_KEYS:
            raise ValueError(f"--grid key {key!r} is not one of NextQuill's own settings {list(GRID_KEYS)}")
        kind = known[key][2]
        parsed = []
        for value in values.split(","):
            try:
                parsed.append(kind(value) if kind in (int, float) else value)
            except ValueError:
                raise ValueError(f"--grid {key}: {value!r} is not a {kind.__name__}") from None
            if kind is float and not math.isfinite(parsed[-1]):
                raise ValueError(f"--grid {key}: {value!r} is not a finite number")
        axes.append([(key, v) for v in dict.fromkeys(parsed)])
    if len({key for axis in axes for key, _ in axis}) != len(axes):
        raise ValueError("--grid names a key twice")
    return [dict(combination) for combination in itertools.product(*axes)]


def candidate_name(keys: dict[str, Any]) -> str:
    """`dce-reference-generic_weight-low-0.5`: each key without its group (the names of the
    candidates tuned before the keys were grouped)."""
    return "_".join(f"{name}-{value:g}" if isinstance(value, float) else f"{name}-{value}"
                    for name, value in ((key.rpartition(".")[2], value) for key, value in keys.items())) or "defaults"


def deployable(keys: dict[str, Any]) -> bool:
    return not any(keys.get(key) == value for key, value in SIMULATION_ONLY.items())


def write_validation_users(sources: list[Path], target: Path, held_out: int) -> list[Path]:
    """Copies of the users `sources` under `target` without their test samples, each user's
    latest `held_out` training samples as the held-out (validation) split. A copy already there
    is kept when it was made from the same user with the same `held_out`; anything else at a
    copy's path is refused."""
    ensure_folder(target)
    paths = []
    for source in sources:
        store = UserStore.open(source)
        path = target / source.name
        made_from = {"user_id": store.user_id, "held_out": held_out}
        if path.exists():
            found = UserStore.open(path).meta.get("validation_of") if (path / "user.json").is_file() else None
            if found != made_from:
                raise FileExistsError(f"{path} is not a validation copy of {source} with {held_out} held-out samples; "
                                      "move it away or choose another --held-out")
            paths.append(path)
            continue
        train = store.samples("train")
        if len(train) <= held_out:
            raise ValueError(f"user {store.user_id} ({source}) has {len(train)} training samples: too few to hold out "
                             f"{held_out} for validation")
        samples = [*train[:-held_out], *(dataclasses.replace(s, split="test") for s in train[-held_out:])]
        extra = {k: v for k, v in store.meta.items() if k not in CORE_META and k != "validation_of"}
        write_user_store(path, store.user_id, store.meta["source"], samples, store.history(),
                         {**extra, "validation_of": made_from})
        paths.append(path)
    return paths


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Where and what one tuning runs."""

    study: Any  # simulations.study.protocol.StudyConfig
    dataset: str
    seed: int
    held_out: int
    out: Path

    @property
    def folder(self) -> Path:
        return self.out / dataset_name(self.dataset) / f"seed-{self.seed}"

    def work(self) -> Path:
        from simulations.study.runner import work_dir

        name = f"seed-{self.seed}-held-out-{self.held_out}"
        return work_dir(self.study) / "tune" / dataset_name(self.dataset) / name

    def config(self, row: str, name: str, keys: dict[str, Any]) -> RunConfig:
        """The study's run of `row` on the validation users, with `keys` over its settings."""
        from simulations.study.protocol import run_config

        work = self.work()
        expert = work / "runs" / EXPERT / "shared_adapter"
        values = run_config(self.study, self.dataset, self.seed, row, expert, work).to_flower()
        values.update({"users.dir": str(work / "users"), "federation.run-dir": str(work / "runs" / name), **keys})
        return RunConfig.from_flower(values)


def run_tuning(tuning: Tuning, candidates: list[dict[str, Any]], progress: bool = True) -> Path:
    """The expert, the baseline and every candidate on the validation users, resumable; returns
    the report."""
    from tqdm.auto import tqdm

    from simulations.datasets.simulated import simulated_user_stores
    from simulations.study.cells import run_federated_cell
    from simulations.study.protocol import run_config
    from simulations.study.runner import work_dir

    study = tuning.study
    cells = [(EXPERT, EXPERT, {}), (BASELINE, BASELINE, {})]
    cells += [(OURS, f"{OURS}_{candidate_name(keys)}", keys) for keys in candidates]
    configs = {name: tuning.config(row, name, keys) for row, name, keys in cells}  # bad values refused first
    source = run_config(study, tuning.dataset, tuning.seed, BASELINE, None, work_dir(study))
    sources = simulated_user_stores(source, study.users)[: study.users]
    write_validation_users(sources, tuning.work() / "users", tuning.held_out)
    ensure_folder(tuning.folder)
    bar = tqdm(cells, desc="tuning cells", unit="cell", disable=not progress)
    for row, name, keys in bar:
        bar.set_postfix_str(name, refresh=True)
        config = configs[name]
        path = tuning.folder / f"{name}.json"
        expert_lost = row == EXPERT and not (config.resolve(config.federation.run_dir) / "shared_adapter").is_dir()
        if path.is_file() and not expert_lost:
            continue
        started = time.perf_counter()
        result = run_federated_cell(config, study.users)
        if path.is_file():  # the expert rebuilt for the cells still to run; its recorded cell stays
            continue
        atomic_write_json(path, {"dataset": tuning.dataset, "seed": tuning.seed, "method": row, "name": name,
                                 "keys": keys, "held_out": tuning.held_out, "run_config": config.to_flower(),
                                 "wall_seconds": time.perf_counter() - started, **result})
        log.info("validation %s: ROUGE-1 %.4f, NLL %.4f", name, result["macro"].get("rouge1", math.nan),
                 result["macro"].get("nll", math.nan))
    return write_report(tuning.out)


def summarize(out: Path) -> list[dict[str, Any]]:
    """One row per (dataset, seed, candidate) cell under `out`: its validation metrics, and its
    per-user difference to the baseline of the same (dataset, seed) with a 95% interval."""
    from simulations.study.paired import bootstrap_interval, per_user

    cells = [json.loads(p.read_text()) for p in sorted(out.glob("*/seed-*/*.json"))]
    rows = []
    for cell in cells:
        if cell["method"] != OURS:
            continue
        baseline = next((c for c in cells if c["method"] == BASELINE and c["dataset"] == cell["dataset"]
                         and c["seed"] == cell["seed"] and c["held_out"] == cell["held_out"]), None)
        ours = per_user(cell)
        row = {"dataset": cell["dataset"], "seed": cell["seed"], "candidate": cell["name"].removeprefix(f"{OURS}_"),
               "keys": upgrade_keys(cell["keys"]), "deployable": deployable(upgrade_keys(cell["keys"])),
               **{m: _mean([u[m] for u in ours.values() if m in u]) for m in TABLE_METRICS}}
        if baseline is not None:
            theirs = per_user(baseline)
            differences = [ours[u]["rouge1"] - theirs[u]["rouge1"] for u in sorted(set(ours) & set(theirs))]
            row["vs_baseline"] = bootstrap_interval({cell["seed"]: differences})
            row["baseline_rouge1"] = _mean([u["rouge1"] for u in theirs.values()])
        rows.append(row)
    return rows


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def choice(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The deployable candidate with the highest validation ROUGE-1 (ties: lower NLL)."""
    eligible = [r for r in rows if r["deployable"] and not math.isnan(r["rouge1"])]
    return max(eligible, key=lambda r: (r["rouge1"], -r["nll"]), default=None)


def write_report(out: Path) -> Path:
    """report.md, tune.csv and tune.png from every cell under `out`."""
    rows = summarize(out)
    lines = ["# NextQuill's settings chosen on a validation split", "",
             "Each user's latest training samples are the validation split (its test samples are set aside, "
             "never scored here). Every candidate trains `nextquill-fed` with the study's budget on the remaining "
             "training samples, with the study's expert trained on the same; `feddpa` (the same adapters, "
             "plain cross-entropy) is the baseline every candidate is paired with, user by user (95% bootstrap "
             "interval over users). Made by `python -m simulations.study.tune`.", ""]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["dataset", "seed", "candidate", "deployable", *TABLE_METRICS, "rouge1_minus_feddpa",
                     "interval_low", "interval_high"])
    for (dataset, seed), group in itertools.groupby(sorted(rows, key=lambda r: (r["dataset"], r["seed"])),
                                                    key=lambda r: (r["dataset"], r["seed"])):
        group = sorted(group, key=lambda r: -r["rouge1"])
        chosen = choice(group)
        baseline = next((r["baseline_rouge1"] for r in group if "baseline_rouge1" in r), math.nan)
        lines += [f"## {dataset}, seed {seed}", "", f"`feddpa` on validation: ROUGE-1 {baseline:.4f}.", "",
                  "| candidate | " + " | ".join(TABLE_METRICS) + " | ROUGE-1 − feddpa [95%] |",
                  "|---|" + "---|" * (len(TABLE_METRICS) + 1)]
        for r in group:
            mean, low, high = r.get("vs_baseline", (math.nan,) * 3)
            mark = " (chosen)" if r is chosen else "" if r["deployable"] else " (simulation only)"
            lines.append(f"| `{r['candidate']}`{mark} | " + " | ".join(f"{r[m]:.4f}" for m in TABLE_METRICS)
                         + f" | {mean:+.4f} [{low:+.4f}, {high:+.4f}] |")
            writer.writerow([dataset, seed, r["candidate"], r["deployable"], *(r[m] for m in TABLE_METRICS),
                             mean, low, high])
        if chosen is not None:
            above = chosen.get("vs_baseline", (math.nan,) * 3)[1] > 0
            lines += ["", f"Chosen: `{chosen['candidate']}` (run config: "
                          + ", ".join(f"`{k} = {v}`" for k, v in chosen["keys"].items()) + "). "
                          + ("Its interval against `feddpa` is above zero on validation."
                             if above else "No interval against `feddpa` is above zero for it on validation: "
                             "the choice is the best of NextQuill's settings tried, not a setting that beats the "
                             "baseline.")]
        lines.append("")
    ensure_folder(out)
    atomic_write_text(out / "tune.csv", table.getvalue())
    if rows:
        _plot(out, rows)
        lines += ["![ROUGE-1 of each candidate minus feddpa's, per user, on validation](tune.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"


def _plot(out: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if "vs_baseline" in r]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.35 * max(1, len(shown))))
    for y, r in enumerate(shown):
        mean, low, high = r["vs_baseline"]
        ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", capsize=3,
                    color="#c44e52" if low > 0 or high < 0 else "#4c72b0")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(shown)), [f"{r['dataset']} s{r['seed']}: {r['candidate']}" for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("validation ROUGE-1, nextquill-fed − feddpa (95% bootstrap over users)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    atomic_write_png(fig, out / "tune.png")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from simulations.study.runner import build_parser as study_parser

    parser = parser or argparse.ArgumentParser(prog="python -m simulations.study.tune", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = study_parser(parser)
    for action in parser._actions:
        if action.dest == "out":
            action.help = ("the tuning folder: cells and report (default: simulations/results/tune-<model> in this "
                           "checkout, or tune-quick with --quick)")
        elif action.dest in ("datasets", "methods", "seeds"):
            action.help = argparse.SUPPRESS  # the study's rows; a tuning takes --dataset and --seed
    parser.add_argument("--dataset", default="reviewers", help="the study dataset to tune on (default: reviewers)")
    parser.add_argument("--seed", type=whole_number(), default=0,
                        help="the study seed whose users are copied (default: 0)")
    parser.add_argument("--held-out", type=whole_number(1), default=4,
                        help="each user's latest training samples held out for validation (default: 4)")
    parser.add_argument("--grid", nargs="+", default=list(DEFAULT_GRID),
                        help=f"key=value[,value...] over {', '.join(GRID_KEYS)}; every combination is a candidate "
                             f"(default: {' '.join(DEFAULT_GRID)})")
    return parser


def tune_from(args: argparse.Namespace) -> int:
    """Run the tuning the parsed command line asks for; prints where the report is."""
    from simulations.study.runner import check_datasets, study_from

    study, study_out = study_from(args)
    out = Path(args.out) if args.out else study_out.with_name(study_out.name.replace("study", "tune", 1))
    dataset = args.dataset if args.dataset in GENERATED else str(Path(args.dataset).expanduser().resolve())
    check_datasets((dataset,))
    report = run_tuning(Tuning(study, dataset, args.seed, args.held_out, out), parse_grid(args.grid))
    print(f"report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from simulations.options import run_command

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_command("tune", lambda: tune_from(args))


if __name__ == "__main__":
    sys.exit(main())
