"""`nextquill`: the command line of NextQuill-Fed.

  nextquill base      build (first use) and measure a base model: perplexity, history sensitivity
  nextquill users     build user stores (shakespeare, synthetic, lamp-json)
  nextquill train     train one LoRA with one method (shared/methods.py) on user stores
  nextquill weights   the expert's DCE and token weights of a user's targets (JSON lines + HTML)
  nextquill evaluate  evaluate an adapter on user stores' held-out samples
  nextquill compare   the single-device comparison of methods on a handful of users
  nextquill study     NextQuill-Fed against every baseline and ablation (resumable), with a report
  nextquill run-config  the run config table of pyproject.toml, generated from RunConfig
  nextquill certs     development TLS certificates for a SuperLink (a CA and a server certificate)
  nextquill keys      SuperNode authentication key pairs (register the .pub with the SuperLink)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from shared.config import BaseSpec, LoraSettings, PromptConfig, TrainConfig, WeightScheme
from shared.methods import METHODS
from shared.named_bases import NAMED_BASES
from shared.paths import DATA_DIR_ENV, data_dir, refuse_to_replace
from shared.run_config import RunConfig
from simulations.datasets import DATASETS, GENERATED, MIN_SAMPLES
from simulations.options import add_settings, run_command, settings_from, whole_number
from simulations.study.compare_config import CompareConfig

log = logging.getLogger("nextquill")
# The methods compared replace the training's single method; decoding keeps its defaults.
COMPARE_SKIPS = ("method", "generation")


def _add_overwrite_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} when it already holds something (atomically: the old content is "
                             "removed only once the new one is complete)")


def _device(args, lora: LoraSettings | None = None):
    from client.device import Device

    return Device.load(settings_from(args, BaseSpec()), lora or LoraSettings(), settings_from(args, PromptConfig()))


def check_output(out: Path, overwrite: bool, reads: dict[str, list], flag: str = "--out") -> None:
    """Before any work: `out` may not be, or hold, what the command reads (`reads`: flag ->
    paths), even with --overwrite; and it is replaced only with --overwrite."""
    target = Path(out).expanduser().resolve()
    reads = {**reads, f"the data directory ({DATA_DIR_ENV} or --data-dir)": [data_dir()]}
    for name, paths in reads.items():
        for path in paths:
            if not path:
                continue
            source = Path(path).expanduser().resolve()
            if target == source or target in source.parents:
                raise ValueError(f"{flag} {out} {'is' if target == source else 'holds'} {name} {path}, which this "
                                 f"command reads; choose another {flag}")
    refuse_to_replace(Path(out), overwrite)


def _model_path(args) -> list[str]:
    return [] if args.model in NAMED_BASES else [args.model]


def _open_stores(paths: list[str], flag: str = "--users"):
    """The stores at `paths`, each once: a store given twice (`u1 ./u1`) would count its samples
    twice in training, and be its own other user in evaluation."""
    from shared.user_store import UserStore

    seen: dict[Path, str] = {}
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if resolved in seen:
            raise ValueError(f"{flag} names the store {resolved} twice ({seen[resolved]} and {path}): give it once")
        seen[resolved] = path
    return [UserStore.open(Path(p)) for p in paths]


def _default_users_dir(dataset: str) -> Path:
    return data_dir() / "users" / dataset


def cmd_base(args) -> int:
    from shared.base_model import measure_base
    from shared.loading import load_base
    from shared.scoring import history_nll, store_scoring_examples
    from shared.user_store import UserStore
    from simulations.datasets import build_synthetic_users

    prompt = settings_from(args, PromptConfig())
    base, tokenizer = load_base(settings_from(args, BaseSpec()))
    scores = {"shakespeare": measure_base(base, tokenizer, prompt)}
    # Synthetic reviewers: 16 users' held-out samples, each with its own and another user's history.
    with tempfile.TemporaryDirectory(prefix="nextquill-base-") as scratch:
        paths = build_synthetic_users(Path(scratch) / "synthetic", n_users=16)
        examples = store_scoring_examples([UserStore.open(p) for p in paths])
    scores["synthetic"] = history_nll(base, tokenizer, examples, prompt)
    print(json.dumps({"model": args.model, **scores}, indent=2))
    return 0


def _build_users(dataset: str, out: Path, args) -> list[Path]:
    from simulations.datasets import build_users

    return build_users(dataset, out, max_users=args.max_users, min_samples=args.min_samples,
                       records=getattr(args, "records", None), golds=getattr(args, "golds", None), seed=args.seed,
                       preference_strength=getattr(args, "preference_strength", None), overwrite=args.overwrite_users)


def cmd_users(args) -> int:
    if args.dataset == "lamp-json" and not args.records:
        raise ValueError("users lamp-json needs --records FILE (a LaMP-style JSON file of input, output, profile)")
    out = Path(args.out) if args.out else _default_users_dir(args.dataset)
    stores = _build_users(args.dataset, out, args)
    print(f"{len(stores)} user stores in {out}")
    return 0


def cmd_train(args) -> int:
    from client.device import Expert

    check_output(Path(args.out), args.overwrite,
                 {"--users": args.users, "--expert": [args.expert], "--model": _model_path(args)})
    stores = _open_stores(args.users)
    expert = Expert.from_dir(Path(args.expert)) if args.expert else None
    config = settings_from(args, TrainConfig())
    device = _device(args, settings_from(args, LoraSettings()))
    report = device.train(stores, config, expert, save_to=Path(args.out), overwrite=args.overwrite)
    print(json.dumps(report.summary(), indent=2))
    print(f"adapter saved to {args.out}")
    return 0


def cmd_weights(args) -> int:
    from client.device import Expert
    from client.inspect_weights import write_inspection

    out = Path(args.out) if args.out else Path(args.user) / "inspection"
    check_output(out, args.overwrite, {"--user": [args.user], "--expert": [args.expert], "--model": _model_path(args)})
    store = _open_stores([args.user], "--user")[0]
    expert = Expert.from_dir(Path(args.expert))
    scheme = settings_from(args, WeightScheme())
    summary = write_inspection(_device(args), store, expert, scheme, out, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from client.evaluation import donor_history
    from shared.metrics import SCORES, macro_average

    stores = _open_stores(args.users)
    device = _device(args)
    if args.adapter:
        device.load_adapter("evaluated", Path(args.adapter))
    rows = []
    for index, store in enumerate(stores):
        donor = stores[(index + 1) % len(stores)] if len(stores) > 1 else None
        row = device.evaluate(store, METHODS[args.method].uses_history, donor_history(donor) if donor else None,
                              adapter="evaluated" if args.adapter else None)
        row.pop("examples")
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"macro_average": macro_average(rows, SCORES)}, indent=2))
    return 0


def cmd_compare(args) -> int:
    from shared.user_store import UserStore
    from simulations.study.compare import run_compare, summary_table

    stores_dir = Path(args.users_dir) if args.users_dir else _default_users_dir(args.dataset)
    run_dir = Path(args.run_dir)
    check_output(run_dir, args.overwrite, {"--users-dir": [stores_dir], "--expert": [args.expert],
                                           "--model": _model_path(args)}, flag="--run-dir")
    args.max_users = args.max_users or None
    args.overwrite_users = False
    paths = _build_users(args.dataset, stores_dir, args)
    config = settings_from(args, CompareConfig(), skip=COMPARE_SKIPS, expert=Path(args.expert) if args.expert else None)
    result = run_compare([UserStore.open(p) for p in paths], config, run_dir, overwrite=args.overwrite)
    print(summary_table(result["summary"]))
    print(f"run directory: {run_dir} (per_user.csv, results.json, summary.md, summary.png)")
    return 0


def cmd_certs(args) -> int:
    from simulations.operations.credentials import make_dev_certificates

    paths = make_dev_certificates(Path(args.out), hosts=tuple(args.hosts), overwrite=args.overwrite)
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return 0


def cmd_keys(args) -> int:
    from simulations.operations.credentials import make_supernode_keys

    pairs = make_supernode_keys(Path(args.out), args.names, overwrite=args.overwrite)
    print(json.dumps({name: {"private": str(p.private_key), "public": str(p.public_key)}
                      for name, p in pairs.items()}, indent=2))
    return 0


def cmd_study(args) -> int:
    from simulations.study.runner import run_study, study_from

    study, out = study_from(args)
    print(f"report: {run_study(study, out) / 'report.md'}")
    return 0


def cmd_local_superlink(args) -> int:
    from simulations.operations.local_superlink import superlink_command

    return superlink_command(args.action)


def cmd_run_config(args) -> int:
    print(RunConfig.flower_toml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextquill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help=f"data directory (default ${DATA_DIR_ENV} or ~/.cache/nextquill)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("base", help="build (first use) and measure a base model")
    add_settings(p, BaseSpec())
    add_settings(p, PromptConfig())
    p.set_defaults(func=cmd_base)

    p = sub.add_parser("users", help="build user stores")
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--out", help="folder of the stores (default: <data-dir>/users/<dataset>)")
    p.add_argument("--min-samples", type=whole_number(1), default=MIN_SAMPLES,
                   help="shakespeare: fewest speeches of a user")
    p.add_argument("--max-users", type=whole_number(1), default=None)
    p.add_argument("--records", help="lamp-json: records file (or LaMP questions file)")
    p.add_argument("--golds", help="lamp-json: LaMP outputs file with 'golds'")
    p.add_argument("--seed", type=whole_number(0), default=0,
                   help="synthetic, reviewers: builds the users; chitchat: draws the --max-users taken")
    p.add_argument("--preference-strength", type=float, default=None,
                   help="reviewers: the share of a user's style words drawn from its favourites, in (0, 1] "
                        "(default: 0.75 to 0.8)")
    p.add_argument("--overwrite", dest="overwrite_users", action="store_true",
                   help="rebuild stores that exist already, and replace folders in the way of new ones (their "
                        "personal adapters and caches go too); without it, existing stores are kept")
    p.set_defaults(func=cmd_users)

    p = sub.add_parser("train", help="train one LoRA on user stores")
    p.add_argument("--users", nargs="+", required=True, help="user store folders (pooled)")
    p.add_argument("--expert", help="expert adapter folder (for the methods whose token weights come from it)")
    p.add_argument("--out", required=True, help="where to save the adapter (PEFT format)")
    _add_overwrite_option(p, "--out")
    add_settings(p, BaseSpec())
    add_settings(p, PromptConfig())
    add_settings(p, TrainConfig())
    add_settings(p, LoraSettings())
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("weights", help="inspect the expert's DCE and token weights of a user's targets")
    p.add_argument("--user", required=True, help="user store folder")
    p.add_argument("--expert", required=True, help="expert adapter folder")
    p.add_argument("--out", help="output folder (default: <store>/inspection)")
    _add_overwrite_option(p, "--out")
    add_settings(p, WeightScheme())
    add_settings(p, BaseSpec())
    add_settings(p, PromptConfig())
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("evaluate", help="evaluate an adapter (or the base) on user stores")
    p.add_argument("--users", nargs="+", required=True)
    p.add_argument("--adapter", help="adapter folder (default: the base alone)")
    add_settings(p, TrainConfig(), only=("method",), help="the method it was trained with (picks the prompt)")
    add_settings(p, BaseSpec())
    add_settings(p, PromptConfig())
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="single-device comparison of methods on a handful of users")
    p.add_argument("--dataset", default="shakespeare", choices=GENERATED)
    p.add_argument("--users-dir", help="folder of the user stores (built when missing)")
    p.add_argument("--min-samples", type=whole_number(1), default=MIN_SAMPLES,
                   help="shakespeare: fewest speeches of a user")
    p.add_argument("--max-users", type=whole_number(0), default=0, help="users built (0: every one; synthetic: 16)")
    p.add_argument("--run-dir", default="runs/compare")
    _add_overwrite_option(p, "--run-dir")
    # The comparison's own settings, then its base, prompt, training and LoRA; the methods
    # compared replace the training's single method.
    add_settings(p, CompareConfig(), skip=COMPARE_SKIPS)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("study", help="every baseline and ablation against NextQuill-Fed, resumable, with a report")
    from simulations.study.runner import build_parser as study_options

    study_options(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("tune", help="NextQuill's own settings chosen on a validation split, paired with feddpa")
    from simulations.study.tune import build_parser as tune_options
    from simulations.study.tune import tune_from

    tune_options(p)
    p.set_defaults(func=tune_from)

    p = sub.add_parser("run-config", help="the [tool.flwr.app.config] table of pyproject.toml, from RunConfig")
    p.set_defaults(func=cmd_run_config)

    p = sub.add_parser("local-superlink", help="the SuperLink `flwr run .` started here and left running: "
                                               "show it, or stop exactly it (by its process id)")
    p.add_argument("action", choices=("status", "stop"))
    p.set_defaults(func=cmd_local_superlink)

    p = sub.add_parser("certs", help="development TLS certificates for a SuperLink (never for production)")
    p.add_argument("--out", default="certs", help="folder for ca.crt, server.pem, server.key")
    p.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"],
                   help="names and addresses the SuperLink is reached at (keep 127.0.0.1: it calls itself)")
    _add_overwrite_option(p, "ca.crt, server.pem and server.key in --out, when they are not a reusable set")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("keys", help="SuperNode authentication key pairs")
    p.add_argument("names", nargs="+", help="one name per SuperNode (device)")
    p.add_argument("--out", default="keys", help="folder for <name>.key and <name>.pub")
    _add_overwrite_option(p, "<name>.key and <name>.pub in --out, when they are not a matching pair")
    p.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.data_dir:
        os.environ[DATA_DIR_ENV] = str(Path(args.data_dir).expanduser().resolve())
    return run_command(f"nextquill {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
