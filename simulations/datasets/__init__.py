"""Builders of user stores (`shared.user_store`), behind one `build_users`: the command line
(`nextquill users`, `nextquill compare`) and a simulated ClientApp's first use both call it.

  shakespeare  every (user play, speaker) with enough speeches (`shakespeare.py`)
  synthetic    users whose replies carry known preference words (`synthetic.py`)
  reviewers    product reviews: content from the input, style words drawn with user-specific
               probabilities, ground truth kept (`reviewers.py`)
  chitchat     real users' chat messages from the PyPI package chitchat-dataset (`chitchat.py`)
  lamp-json    LaMP / LongLaMP-style JSON files of input, output, profile (`lamp.py`)

Every input is checked before anything is written; stores that exist already are kept unless
`overwrite`.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from shared.user_store import DataError
from simulations.datasets.chitchat import build_chitchat_users
from simulations.datasets.lamp import import_lamp_json
from simulations.datasets.plans import TEST_FRACTION
from simulations.datasets.reviewers import build_reviewer_users
from simulations.datasets.shakespeare import MIN_SAMPLES, build_shakespeare_users
from simulations.datasets.synthetic import build_synthetic_users

DATASETS = ("shakespeare", "synthetic", "reviewers", "chitchat", "lamp-json")
GENERATED = ("shakespeare", "synthetic", "reviewers", "chitchat")  # built from what the packages ship: no input file


def dataset_name(dataset: str | Path) -> str:
    """The name of a dataset's users and results: a generated dataset's own name, or for a file
    `lamp-<file stem>-<the first 8 hex digits of its content's SHA-256>`, so that two files of
    one name never share users or cells and a file moved elsewhere keeps them."""
    if str(dataset) in GENERATED:
        return str(dataset)
    path = Path(dataset).expanduser().resolve()
    return f"lamp-{path.stem}-{_content_digest(path, *_file_stamp(path))[:8]}"


def _file_stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as error:
        raise DataError(f"dataset file {path}: cannot read: {error.strerror or error}") from None
    if not path.is_file():
        raise DataError(f"dataset file {path}: is not a file")
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _content_digest(path: Path, size: int, mtime_ns: int) -> str:  # keyed by the file's stamp too
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise DataError(f"dataset file {path}: cannot read: {error.strerror or error}") from None
    return digest.hexdigest()


def build_users(
    dataset: str,
    out_dir: str | Path,
    *,
    max_users: int | None = None,
    min_samples: int = MIN_SAMPLES,
    records: str | Path | None = None,
    golds: str | Path | None = None,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    preference_strength: float | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """The stores of `dataset` in `out_dir`, one folder per user; returns their paths.

    max_users: shakespeare keeps the first ones (play order); synthetic and reviewers build
    that many (default 16). min_samples: shakespeare's fewest speeches per speaker. records, golds:
    lamp-json's records file and, for LaMP's split files, its outputs file. seed: draws the
    synthetic users, reviewers and the chitchat users taken. preference_strength: the reviewers'
    favourites' share of their choices (None: the builder's own, 0.75 to 0.8).
    """
    if preference_strength is not None and dataset != "reviewers":
        raise ValueError(f"preference strength applies to the reviewers, not to dataset {dataset!r}")
    if dataset == "shakespeare":
        return build_shakespeare_users(out_dir, min_samples=min_samples, test_fraction=test_fraction,
                                       max_users=max_users, overwrite=overwrite)
    if dataset == "synthetic":
        return build_synthetic_users(out_dir, n_users=max_users or 16, test_fraction=test_fraction, seed=seed,
                                     overwrite=overwrite)
    if dataset == "reviewers":
        return build_reviewer_users(out_dir, n_users=max_users or 16, test_fraction=test_fraction, seed=seed,
                                    preference_strength=preference_strength, overwrite=overwrite)
    if dataset == "chitchat":
        return build_chitchat_users(out_dir, max_users=max_users, test_fraction=test_fraction, seed=seed,
                                    overwrite=overwrite)
    if dataset == "lamp-json":
        if records is None:
            raise ValueError("dataset lamp-json needs a records file (a LaMP-style JSON file of input, output, "
                             "profile)")
        return import_lamp_json(out_dir, Path(records), Path(golds) if golds else None, test_fraction=test_fraction,
                                overwrite=overwrite)
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


__all__ = ["DATASETS", "GENERATED", "MIN_SAMPLES", "build_chitchat_users", "dataset_name", "build_reviewer_users",
           "build_shakespeare_users", "build_synthetic_users", "build_users", "import_lamp_json"]
