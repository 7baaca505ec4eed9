"""Which user a node serves, and that user's store: `user-dir` in a deployment (the store on
the device), `partition-id` in a simulation, where the simulated users' stores are built on
first use (`simulations.datasets.build_users`, shipped in the app bundle for this)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.config import RunConfig
from shared.paths import file_lock
from shared.user_store import UserStore, list_user_stores
from simulations.datasets import GENERATED, build_users, dataset_name

USER_DIR_KEY = "user-dir"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"

_store_paths: dict[tuple, list[Path]] = {}


def simulation_users_dir(config: RunConfig) -> Path:
    if config.users_dir:
        return config.resolve(config.users_dir)
    name = dataset_name(config.dataset if config.dataset in GENERATED else config.resolve(config.dataset))
    if config.preference_strength:
        name += f"-strength-{config.preference_strength:g}"
    if config.users_seed:
        name += f"-users-seed-{config.users_seed}"
    return config.resolve(f"users/{name}")


def _build_simulated_users(config: RunConfig, root: Path, num_partitions: int) -> None:
    """The users of `config.dataset` in `root`: a generated dataset (synthetic: one user per
    SuperNode; shakespeare: every speaker), or the users of a LaMP-style JSON file."""
    if config.dataset in GENERATED:
        max_users = None if config.dataset == "shakespeare" else num_partitions
        # The users are data, built once per folder: their seed is users-seed, never the run's
        # (which sets initialisation and sample order), so runs of several seeds, in any order,
        # see the same users.
        build_users(config.dataset, root, max_users=max_users, seed=config.users_seed,
                    preference_strength=config.preference_strength or None)
    else:
        build_users("lamp-json", root, records=config.resolve(config.dataset))


def simulation_store_paths(config: RunConfig, num_partitions: int) -> list[Path]:
    """The simulated users' stores, built on first use (one process builds, the others wait)."""
    root = simulation_users_dir(config)
    key = (str(root), config.dataset, num_partitions)
    if key in _store_paths:
        return _store_paths[key]
    with file_lock(root.parent / f".{root.name}.lock"):
        paths = list_user_stores(root)
        if len(paths) < num_partitions:
            try:
                _build_simulated_users(config, root, num_partitions)
            except ValueError as error:
                raise ValueError(f"dataset {config.dataset!r} cannot give {num_partitions} simulated users: {error}; "
                                 "lower num-supernodes") from None
            paths = list_user_stores(root)
    if len(paths) < num_partitions:
        raise ValueError(
            f"the simulation has {num_partitions} SuperNodes but dataset {config.dataset!r} has only "
            f"{len(paths)} users (in {root}); lower num-supernodes"
        )
    _store_paths[key] = paths
    return paths


def user_store(node_config: Mapping[str, Any], config: RunConfig) -> UserStore:
    """The store of the user this node serves: `user-dir` in a deployment, `partition-id`
    in a simulation."""
    if USER_DIR_KEY in node_config:
        return UserStore.open(Path(str(node_config[USER_DIR_KEY])).expanduser())
    if PARTITION_ID_KEY in node_config and NUM_PARTITIONS_KEY in node_config:
        paths = simulation_store_paths(config, int(node_config[NUM_PARTITIONS_KEY]))
        return UserStore.open(paths[int(node_config[PARTITION_ID_KEY])])
    raise ValueError(
        f"node config {dict(node_config)} names no user: start the SuperNode with "
        f"--node-config '{USER_DIR_KEY}=\"/path/to/user/store\"' (simulations set {PARTITION_ID_KEY})"
    )


def simulation_donors(node_config: Mapping[str, Any], config: RunConfig) -> list[UserStore]:
    """The donor users of a simulated node (`client.reference.donor_stores`), for the counterfactual
    history 'donors'; refused on a deployed device, which holds no other user's history."""
    from client.reference import donor_stores

    if USER_DIR_KEY in node_config or PARTITION_ID_KEY not in node_config:
        raise ValueError("the counterfactual history 'donors' (run config dce-reference / mce-reference) is for "
                         "simulations only: a deployed device holds no other user's history; use 'generic'")
    paths = simulation_store_paths(config, int(node_config[NUM_PARTITIONS_KEY]))
    users = int(node_config[NUM_PARTITIONS_KEY])
    stores = [UserStore.open(path) for path in paths[:users]]
    return donor_stores(stores, int(node_config[PARTITION_ID_KEY]))
