"""Which user a node serves: a deployment names its store, a simulation maps partitions to
stores built on first use, and a node that names none is told how."""

import json

import pytest

from client.node_store import user_store
from shared.config import FederationSettings, UsersSettings
from shared.run_config import RunConfig


def test_a_node_without_a_user_is_told_how_to_name_one():
    with pytest.raises(ValueError, match="user-dir"):
        user_store({}, RunConfig())


def test_simulated_nodes_map_partitions_to_user_stores_built_on_first_use(tmp_path):
    config = RunConfig(users=UsersSettings(dataset="synthetic", dir=str(tmp_path / "users")))
    stores = [user_store({"partition-id": i, "num-partitions": 3}, config) for i in range(3)]
    assert len({s.user_id for s in stores}) == 3
    with pytest.raises(ValueError, match="lower num-supernodes"):
        user_store({"partition-id": 0, "num-partitions": 30000}, config)


@pytest.mark.parametrize("dataset", ["synthetic", "reviewers"])
def test_the_simulated_users_do_not_depend_on_which_seed_built_them_first(tmp_path, dataset):
    # A study runs seeds 0, 1, 2 on the same users, and may start at any of them.
    built = {}
    for seed in (0, 1):
        config = RunConfig(users=UsersSettings(dataset=dataset, dir=str(tmp_path / f"users-{seed}")),
                           federation=FederationSettings(seed=seed))
        built[seed] = [(s.user_id, [(x.x, x.y) for x in s.samples()])
                       for s in (user_store({"partition-id": i, "num-partitions": 2}, config) for i in range(2))]
    assert built[0] == built[1]


def test_a_deployed_node_opens_the_store_it_names_and_a_lamp_dataset_gets_its_own_folder(tmp_path):
    records = [{"id": f"r{i}", "user_id": f"u{i % 2}", "input": f"Write {i}", "output": f"Text {i}.",
                "profile": [{"id": "p", "text": "Old text."}]} for i in range(6)]
    (tmp_path / "reviews.json").write_text(json.dumps(records))
    config = RunConfig(users=UsersSettings(dataset=str(tmp_path / "reviews.json")))
    simulated = [user_store({"partition-id": i, "num-partitions": 2}, config) for i in range(2)]
    assert sorted(s.user_id for s in simulated) == ["u0", "u1"]
    assert simulated[0].path.parent.name.startswith("lamp-reviews-")
    # Another file of the same name is another dataset: its users get their own folder.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "reviews.json").write_text(json.dumps(records[:4]))
    other = RunConfig(users=UsersSettings(dataset=str(tmp_path / "other" / "reviews.json")))
    assert user_store({"partition-id": 0, "num-partitions": 2}, other).path.parent != simulated[0].path.parent
    deployed = user_store({"user-dir": str(simulated[1].path)}, config)
    assert deployed.user_id == simulated[1].user_id


def stores_of_my_own(config, num_partitions):  # a users-builder of another simulation
    from simulations.datasets import build_users

    root = config.resolve(config.users.dir)
    build_users("synthetic", root, max_users=num_partitions, seed=7)
    return sorted(p for p in root.iterdir() if p.is_dir())[::-1]


def test_a_simulation_takes_its_users_from_the_builder_the_run_config_names(tmp_path):
    config = RunConfig(users=UsersSettings(dir=str(tmp_path / "mine"),
                                          builder="tests.test_node_store:stores_of_my_own"))
    first = user_store({"partition-id": 0, "num-partitions": 2}, config)
    assert first.path == sorted((tmp_path / "mine").iterdir())[-1]


@pytest.mark.parametrize("name, message", [
    ("tests.no_such_module:build", "cannot load it"),
    ("tests.test_node_store:no_such_function", "cannot load it"),
    ("tests.test_node_store:json", "is not a function"),
])
def test_a_users_builder_that_cannot_be_loaded_is_named(name, message):
    config = RunConfig(users=UsersSettings(builder=name))
    with pytest.raises(ValueError, match=f"users.builder {name!r}.*{message}"):
        user_store({"partition-id": 0, "num-partitions": 2}, config)


def test_a_users_builder_that_is_not_module_colon_function_is_refused_by_the_run_config():
    with pytest.raises(ValueError, match="users.builder"):
        RunConfig.from_flower({"users.builder": "simulations/datasets.py"})
