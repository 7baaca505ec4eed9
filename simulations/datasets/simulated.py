"""The simulated users of a Flower simulation: their store folders, built on first use.

A simulated ClientApp reaches this through the run config's `users.builder` (by default
`simulations.datasets.simulated:simulated_user_stores`), never by an import of the product's
code, so `client/` knows nothing of how simulated users are made; shipped in the app bundle.
"""

from __future__ import annotations

from pathlib import Path

from shared.paths import file_lock
from shared.run_config import RunConfig
from shared.user_store import list_user_stores
from simulations.datasets import GENERATED, build_users, dataset_name


def simulation_users_dir(config: RunConfig) -> Path:
    if config.users.dir:
        return config.resolve(config.users.dir)
    dataset = config.users.dataset
    name = dataset_name(dataset if dataset in GENERATED else config.resolve(dataset))
    if config.users.preference_strength:
        name += f"-strength-{config.users.preference_strength:g}"
    if config.users.seed:
        name += f"-users-seed-{config.users.seed}"
    return config.resolve(f"users/{name}")


def _build_simulated_users(config: RunConfig, root: Path, num_partitions: int) -> None:
    """The users of `config.users.dataset` in `root`: a generated dataset (synthetic: one user per
    SuperNode; shakespeare: every speaker), or the users of a LaMP-style JSON file."""
    if config.users.dataset in GENERATED:
        max_users = None if config.users.dataset == "shakespeare" else num_partitions
        # The users are data, built once per folder: their seed is users.seed, never the run's
        # (which sets initialisation and sample order), so runs of several seeds, in any order,
        # see the same users.
        build_users(config.users.dataset, root, max_users=max_users, seed=config.users.seed,
                    preference_strength=config.users.preference_strength or None)
    else:
        build_users("lamp-json", root, records=config.resolve(config.users.dataset))


def simulated_user_stores(config: RunConfig, num_partitions: int) -> list[Path]:
    """The simulated users' stores, at least `num_partitions` of them, built on first use (one
    process builds, the others wait)."""
    root = simulation_users_dir(config)
    with file_lock(root.parent / f".{root.name}.lock"):
        paths = list_user_stores(root)
        if len(paths) < num_partitions:
            try:
                _build_simulated_users(config, root, num_partitions)
            except ValueError as error:
                raise ValueError(f"dataset {config.users.dataset!r} cannot give {num_partitions} simulated users: "
                                 f"{error}; "
                                 "lower num-supernodes") from None
            paths = list_user_stores(root)
    if len(paths) < num_partitions:
        raise ValueError(
            f"the simulation has {num_partitions} SuperNodes but dataset {config.users.dataset!r} has only "
            f"{len(paths)} users (in {root}); lower num-supernodes"
        )
    return paths
