"""The coordinator's phases over the real ClientApp (in-process grid): expert, distribution,
personalization on the split, evaluation; resume after a crash; failing nodes."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from client.client_app import app as client_app
from client.personal_state import personal_path
from coordinator.checkpoint import load_checkpoint
from coordinator.federation import RunFailed, run_federation
from coordinator.nodes import NotEnoughNodes
from shared.adapter_files import adapter_digest
from shared.errors import AdapterLoadError
from shared.expert_package import expert_cache_dir
from shared.paths import OutputExistsError
from shared.run_config import RunConfig
from shared.user_store import UserStore
from shared.wire import EVALUATE_METRICS, PACKED, TRAIN_METRICS, SharedLayout
from simulations.datasets import build_synthetic_users
from tests.loopback import CoordinatorCrash, LoopbackGrid
from tests.samples import small_run


@pytest.fixture
def users(tmp_path):
    return build_synthetic_users(tmp_path / "users", n_users=3, samples_per_user=10)


def _config(model_dir, run_dir, **overrides) -> RunConfig:
    return RunConfig.from_flower(small_run(model_dir, run_dir, **overrides))


def _grid(config, users, **kwargs) -> LoopbackGrid:
    return LoopbackGrid(client_app, [{"user-dir": str(path)} for path in users], config.to_flower(), **kwargs)


def test_a_run_goes_through_every_phase_and_writes_its_run_directory(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run")
    grid = _grid(config, users)
    result = run_federation(grid, config)

    run_dir = tmp_path / "run"
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.phase == "done"
    assert adapter_digest(run_dir / "expert") == result.expert_digest == checkpoint.expert_digest
    # The expert was delivered once to each device and cached by its digest.
    assert (expert_cache_dir(result.expert_digest) / "adapter_model.safetensors").is_file()

    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["round"]) for r in rows] == [("expert", 1), ("personalize", 1), ("personalize", 2),
                                                        ("evaluate", 2)]
    assert all(r["accepted"] == 2 and r["aggregated"] for r in rows[:3])
    assert all(set(r) >= {"train-loss", "upload_bytes_per_client"} for r in rows[:3])

    with open(run_dir / "evaluation.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 3 and set(table[0]) == {"node_id"} | EVALUATE_METRICS
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["users"] == 3 and "eval-rougeL_std" in summary["macro_average"]
    assert (run_dir / "rounds.png").stat().st_size > 0
    assert (run_dir / "shared_adapter" / "adapter_config.json").is_file()

    # Personalization sent and received the shared adapter only; personal parts stayed home.
    train_messages = [m for m in grid.delivered if m.metadata.message_type == "train"]
    personal_sent = [k for m in train_messages for k in _sent(m) if "personal" in k]
    assert not personal_sent
    assert set(checkpoint.shared) == set(load_file(run_dir / "checkpoint.safetensors"))
    trained = [UserStore.open(p) for p in users
               if personal_path(UserStore.open(p), f"{checkpoint.run_id}-personalize").is_file()]
    assert len(trained) >= 2


def test_replies_carry_the_shared_parameters_and_allow_listed_metrics_only(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"federation.rounds": 1, "train.method": "mce-only"})
    grid = _grid(config, users)
    replies = []
    original = grid.deliver

    def record(message):
        reply = original(message)
        replies.append((message, reply))
        return reply

    grid.deliver = record
    run_federation(grid, config)
    train = [(m, r) for m, r in replies if m.metadata.message_type == "train"]
    assert train
    for message, reply in train:
        assert set(reply.content.array_records) == {"arrays"}
        assert set(reply.content["arrays"]) == set(message.content["arrays"]) == {PACKED}
        sent, trained = message.content["arrays"][PACKED].numpy(), reply.content["arrays"][PACKED].numpy()
        assert trained.shape == sent.shape and trained.dtype == sent.dtype and (trained != sent).any()
        assert set(reply.content["metrics"]) <= TRAIN_METRICS


def test_a_restarted_coordinator_resumes_after_the_last_completed_round(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run")
    with pytest.raises(CoordinatorCrash):
        run_federation(_grid(config, users, crash_after_train_rounds=2), config)
    checkpoint = load_checkpoint(tmp_path / "run")
    assert (checkpoint.phase, checkpoint.round) == ("personalize", 1)

    grid = _grid(config, users)
    result = run_federation(grid, config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["round"]) for r in rows] == [("expert", 1), ("personalize", 1), ("personalize", 2),
                                                        ("evaluate", 2)]
    # Only the missing round was trained again, from the checkpoint's shared state and run id.
    train = [m for m in grid.delivered if m.metadata.message_type == "train"]
    assert {m.content["config"]["server-round"] for m in train} == {2}
    assert {m.content["config"]["run-id"] for m in train} == {checkpoint.run_id}
    assert result.expert_digest == checkpoint.expert_digest
    # Run again once finished: nothing is sent, and the recorded evaluation is what it reports.
    again = _grid(config, users)
    assert run_federation(again, config).summary == result.summary and again.delivered == []


def test_a_resumed_run_with_another_config_is_refused(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 1})
    run_federation(_grid(config, users), config)
    changed = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 1,
                                                      "train.learning-rate": 1e-2})
    with pytest.raises(ValueError, match="learning-rate differ"):
        run_federation(_grid(changed, users), changed)


def test_failing_nodes_are_excluded_and_the_round_goes_on(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 2,
                                                     "federation.clients-per-round": 3})
    run_federation(_grid(config, users, failing_nodes=frozenset({1001})), config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [(r["sampled"], r["replies"], r["accepted"]) for r in rows if r["phase"] == "personalize"] == [(3, 3, 2)] * 2


def test_too_few_valid_replies_leave_the_shared_state_unchanged(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run",
                     **{"train.method": "sft", "federation.rounds": 1, "federation.clients-per-round": 3,
                        "federation.min-replies": 3})
    grid = _grid(config, users, failing_nodes=frozenset({1000}))
    # Two of three devices answer each message: training goes on without aggregating, and the
    # final evaluation, short of min-replies too, leaves the run unfinished.
    with pytest.raises(RunFailed, match=r"evaluation after round 1: 2 of 3 devices replied without an error, fewer "
                                        r"than federation.min-replies \(3\)"):
        run_federation(grid, config)
    sent = _sent(next(m for m in grid.delivered if m.metadata.message_type == "train"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert rows[0]["aggregated"] is False
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.phase == "evaluate"
    assert all(torch.equal(checkpoint.shared[k], sent[k]) for k in sent)


def test_a_round_every_device_fails_stops_the_run_unfinished_and_a_rerun_goes_on(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 2,
                                                     "federation.clients-per-round": 3})
    failing = frozenset({1000, 1001, 1002})
    with pytest.raises(RunFailed, match=r"personalize round 1: 0 of 3 devices replied without an error.*node 1000"):
        run_federation(_grid(config, users, failing_nodes=failing), config)
    assert load_checkpoint(tmp_path / "run") is None  # no round completed: nothing to resume, nothing finished
    assert not (tmp_path / "run" / "evaluation.csv").exists()
    # The cause fixed, the rerun trains both rounds and finishes.
    result = run_federation(_grid(config, users), config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["round"], r["accepted"]) for r in rows if "aggregated" in r] == [
        ("personalize", 1, 3), ("personalize", 2, 3)]
    assert load_checkpoint(tmp_path / "run").phase == "done" and result.summary is not None


def test_a_device_whose_cached_expert_is_corrupt_gets_it_again(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"federation.rounds": 1})
    first = run_federation(_grid(config, users), config)
    cached = expert_cache_dir(first.expert_digest) / "adapter_model.safetensors"
    cached.write_bytes(b"tampered")
    again = _config(model_dir, tmp_path / "run2", **{"federation.rounds": 1,
                                                     "expert.adapter": str(tmp_path / "run" / "expert")})
    grid = _grid(again, users)
    run_federation(grid, again)
    delivered = [m for m in grid.delivered if m.metadata.message_type == "query"
                 and m.content["config"]["action"] == "expert-deliver"]
    assert len(delivered) == 3 and adapter_digest(cached.parent) == first.expert_digest


def test_float16_halves_the_bytes_and_one_array_per_parameter_aggregates_as_packed(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 1,
                                                     "sharing.transport-dtype": "float16"})
    grid = _grid(config, users)
    result = run_federation(grid, config)
    sent = next(m for m in grid.delivered if m.metadata.message_type == "train").content["arrays"]
    assert {str(a.dtype) for a in sent.values()} == {"float16"}
    assert {v.dtype for v in result.shared.values()} == {torch.float32}
    rows = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    # float32, one array per parameter: twice the payload, and the same aggregate as packed.
    full = _config(model_dir, tmp_path / "run32", **{"train.method": "sft", "federation.rounds": 1,
                                                     "sharing.pack": False})
    grid32 = _grid(full, users)
    result32 = run_federation(grid32, full)
    sent32 = next(m for m in grid32.delivered if m.metadata.message_type == "train")
    assert set(sent32.content["arrays"]) == set(_sent(sent32)) and len(sent32.content["arrays"]) > 1
    rows32 = [json.loads(line) for line in (tmp_path / "run32" / "rounds.jsonl").read_text().splitlines()]
    assert sum(a.numpy().nbytes for a in sent.values()) * 2 == sum(v.numel() * 4 for v in result.shared.values())
    assert rows[0]["upload_bytes_per_client"] < 0.6 * rows32[0]["upload_bytes_per_client"]
    packed = _config(model_dir, tmp_path / "packed", **{"train.method": "sft", "federation.rounds": 1})
    expected = run_federation(_grid(packed, users), packed).shared
    assert list(result32.shared) == list(expected)
    assert all(torch.equal(result32.shared[k], expected[k]) for k in expected)


def _sent(message, request=None) -> dict[str, torch.Tensor]:
    """The shared parameters a message carries, in the layout its request (or itself) names."""
    layout = SharedLayout.from_config((request or message).content["config"])
    return layout.decode(message.content["arrays"])


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_more_clients_per_round_than_nodes_goes_on_with_those_connected(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 2,
                                                     "federation.clients-per-round": 5,
                                                     "evaluate.clients": 5, "federation.connect-timeout": 0.2})
    run_federation(_grid(config, users), config)
    rows = _rows(tmp_path / "run")
    assert [(r["phase"], r["sampled"], r["accepted"]) for r in rows] == [("personalize", 3, 3)] * 2 + [
        ("evaluate", 3, 3)]


def test_a_node_that_leaves_mid_run_does_not_stop_the_run(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 3,
                                                     "federation.clients-per-round": 3,
                                                     "federation.connect-timeout": 0.2})
    run_federation(_grid(config, users, leaving={1002: 1}), config)
    rows = _rows(tmp_path / "run")
    assert [(r["phase"], r["sampled"], r["accepted"]) for r in rows] == [
        ("personalize", 3, 3), ("personalize", 2, 2), ("personalize", 2, 2), ("evaluate", 2, 2)]


def test_fewer_nodes_than_min_replies_end_the_run_with_a_message_and_a_resumable_checkpoint(model_dir, users,
                                                                                            tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 3,
                                                     "federation.clients-per-round": 3,
                                                     "federation.min-replies": 3, "federation.connect-timeout": 0.2})
    with pytest.raises(NotEnoughNodes, match=r"2 SuperNode\(s\) connected after waiting 0 s .* fewer than the 3 a "
                                             r"round needs \(federation.min-replies\).* run the same command again "
                                             r"to resume"):
        run_federation(_grid(config, users, leaving={1002: 1}), config)
    assert (load_checkpoint(tmp_path / "run").phase, load_checkpoint(tmp_path / "run").round) == ("personalize", 1)


def test_a_run_dir_holding_other_files_is_refused_and_left_as_it_was(model_dir, users, tmp_path):
    run_dir = tmp_path / "thesis"
    run_dir.mkdir()
    (run_dir / "chapter1.tex").write_text("mine")
    config = _config(model_dir, run_dir, **{"train.method": "sft", "federation.rounds": 1})
    with pytest.raises(OutputExistsError, match="run-dir .*thesis holds files that are not a NextQuill run"):
        run_federation(_grid(config, users), config)
    assert sorted(p.name for p in run_dir.iterdir()) == ["chapter1.tex"]


def test_an_expert_of_another_base_is_refused_before_any_round(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"federation.rounds": 1})
    first = run_federation(_grid(config, users), config)
    expert = tmp_path / "run" / "expert"
    metadata = json.loads((expert / "nextquill.json").read_text())
    (expert / "nextquill.json").write_text(json.dumps({**metadata, "base": "another-base"}))
    again = _config(model_dir, tmp_path / "run2", **{"federation.rounds": 1, "expert.adapter": str(expert)})
    grid = _grid(again, users)
    with pytest.raises(AdapterLoadError, match="trained on another base"):
        run_federation(grid, again)
    assert first.expert_digest and not grid.delivered and not (tmp_path / "run2").exists()


def test_the_server_app_stops_a_run_it_cannot_do_with_one_line(model_dir, users, tmp_path, caplog):
    from flwr.app import Context, RecordDict

    from coordinator.server_app import RunStopped
    from coordinator.server_app import main as server_main

    config = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 1}).to_flower()
    bad = {**config, "train.learning-rate": float("nan")}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=bad)
    with pytest.raises(RunStopped, match="^run config train.learning-rate must be a finite number, got nan$"):
        server_main(_grid(_config(model_dir, tmp_path / "run"), users), context)
    assert any(r.getMessage() == "run stopped: run config train.learning-rate must be a finite number, got nan"
               for r in caplog.records)
    assert not (tmp_path / "run").exists()


def test_a_run_dir_of_an_earlier_version_resumes_when_the_new_keys_hold_their_defaults(model_dir, users, tmp_path):
    config = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 1})
    run_federation(_grid(config, users), config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["federation.connect-timeout"]  # as a run started before the key existed recorded it
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    assert load_checkpoint(tmp_path / "run").phase == "done"
    run_federation(_grid(config, users), config)
    changed = _config(model_dir, tmp_path / "run", **{"train.method": "sft", "federation.rounds": 1,
                                                      "federation.connect-timeout": 5.0})
    with pytest.raises(ValueError, match="connect-timeout differ"):
        run_federation(_grid(changed, users), changed)
