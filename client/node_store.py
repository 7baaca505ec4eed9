"""Which user a node serves, and that user's store: `user-dir` in a deployment (the store on
the device), `partition-id` in a simulation, where the stores come from the run config's
`users.builder` ("module:function", loaded when a simulated node first needs it; the project's
own builds the dataset's users on first use), so the device code imports no simulation code."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shared.run_config import RunConfig
from shared.user_store import UserStore

USER_DIR_KEY = "user-dir"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"

UsersBuilder = Callable[[RunConfig, int], list[Path]]
_store_paths: dict[tuple, list[Path]] = {}


def users_builder(name: str) -> UsersBuilder:
    """The function a `users.builder` value names ("package.module:function")."""
    module_name, _, function_name = name.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"run config users.builder {name!r}: cannot load it ({error}); give 'module:function'") \
            from None
    if not callable(builder):
        raise ValueError(f"run config users.builder {name!r} is not a function")
    return builder


def simulation_store_paths(config: RunConfig, num_partitions: int) -> list[Path]:
    """The simulated users' store folders (`users.builder`), once per process and dataset."""
    key = (config.users, num_partitions)
    if key not in _store_paths:
        _store_paths[key] = users_builder(config.users.builder)(config, num_partitions)
    return _store_paths[key]


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
        raise ValueError("the counterfactual history 'donors' (run config weights.dce-reference / "
                         "train.mce-reference) is for simulations only: a deployed device holds no other user's "
                         "history; use 'generic'")
    paths = simulation_store_paths(config, int(node_config[NUM_PARTITIONS_KEY]))
    users = int(node_config[NUM_PARTITIONS_KEY])
    stores = [UserStore.open(path) for path in paths[:users]]
    return donor_stores(stores, int(node_config[PARTITION_ID_KEY]))
