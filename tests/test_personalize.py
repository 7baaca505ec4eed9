"""On-device personalization end to end on a small random model: the expert's DCE cache,
every method, inspection files, evaluation, the compare run and the CLI's errors."""

import json

import pytest
import torch

from client.evaluation import donor_history
from client.inspect_weights import write_inspection
from client.personalize import Device, Expert
from client.token_weights import cached_token_probs
from shared.config import BaseSpec, LoraSettings, PromptConfig, TrainConfig, WeightScheme
from shared.loading import load_base
from shared.methods import METHODS
from shared.user_store import UserStore
from simulations.cli import METHOD_NAMES, main
from simulations.datasets import build_synthetic_users, import_lamp_json
from simulations.single_device import CompareConfig, run_compare

PROMPT = PromptConfig(history_tokens=48, context_tokens=24, response_tokens=24)
ONE_STEP = dict(max_steps=1, batch_size=4)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("users")
    return [UserStore.open(p) for p in build_synthetic_users(root, n_users=3, samples_per_user=10)]


@pytest.fixture(scope="module")
def device(model_dir):
    base, tokenizer = load_base(BaseSpec(str(model_dir), quantization="nf4", device="cpu"))
    return Device.around(base, tokenizer, model_dir, LoraSettings(lora_r=4, lora_alpha=8), PROMPT)


@pytest.fixture(scope="module")
def experts(device, stores, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    for seed in (0, 1):
        device.train(stores[1:], TrainConfig(method="context-sft", seed=seed, **ONE_STEP), save_to=root / f"e{seed}",
                     progress=False)
    return Expert.from_dir(root / "e0"), Expert.from_dir(root / "e1")


def test_cli_offers_every_method_of_the_trainer():
    assert sorted(METHOD_NAMES) == sorted(METHODS)


def test_expert_probabilities_are_cached_by_digest_and_a_changed_expert_invalidates_them(device, stores, experts):
    store = stores[0]
    first, second = experts
    assert first.digest != second.digest
    probs = device.expert_probs(store, first)
    assert set(probs) == {s.id for s in store.samples("train")}
    cache_files = list((store.cache_dir / "token_probs").glob("*.json"))
    assert len(cache_files) == 1 and first.digest in cache_files[0].read_text()
    # A second call is served from the cache: the expert is not even loaded.
    def no_expert():
        raise AssertionError("the cache should have answered")

    assert cached_token_probs(store, no_expert, device.tokenizer, first.digest, device.base_id, PROMPT) == probs
    # Another expert: recomputed, and the stale cache is gone.
    other = device.expert_probs(store, second)
    assert other != probs
    cache_files = list((store.cache_dir / "token_probs").glob("*.json"))
    assert len(cache_files) == 1 and second.digest in cache_files[0].read_text()
    for p in other.values():
        assert len(p.token_ids) == len(p.prob_with) == len(p.prob_without)
        assert all(0.0 <= v <= 1.0 for v in p.prob_with + p.prob_without)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_saves_a_peft_adapter(device, stores, experts, method, tmp_path):
    report = device.train([stores[0]], TrainConfig(method=method, **ONE_STEP), experts[0], save_to=tmp_path / "a",
                          progress=False)
    assert report.steps == 1 and torch.isfinite(torch.tensor(report.loss)).all()
    meta = json.loads((tmp_path / "a" / "nextquill.json").read_text())
    assert meta["method"] == method and meta["users"] == [stores[0].user_id]
    # Only methods with an alignment term report L_p.
    assert (report.l_p[0] > 0) == METHODS[method].aligns_effects


def test_methods_with_expert_weights_refuse_to_train_without_an_expert(device, stores):
    with pytest.raises(ValueError, match="needs an expert"):
        device.train([stores[0]], TrainConfig(method="nextquill", **ONE_STEP), None, progress=False)


def test_authors_variant_trains_without_an_expert(device, stores):
    config = TrainConfig(method="nextquill", weight_source="self", weighted_alignment=False, **ONE_STEP)
    assert device.train([stores[0]], config, None, progress=False).steps == 1


def test_inspection_lists_each_target_token_with_offsets_dce_and_weight(device, stores, experts, tmp_path):
    store = stores[0]
    summary = write_inspection(device, store, experts[0], WeightScheme(), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "token_weights.jsonl").read_text().splitlines()]
    assert len(rows) == len(store.samples())
    for row in rows:
        for token in row["tokens"]:
            assert 0 <= token["start"] <= token["end"] <= len(row["target"])
            assert token["weight"] in (pytest.approx(0.9), pytest.approx(0.1))
        pieces = "".join(row["target"][t["start"]:t["end"]] for t in row["tokens"])
        assert pieces.replace(" ", "") == row["target"].replace(" ", "")[: len(pieces.replace(" ", ""))]
    assert summary["preference_tokens"] > 0 and "recall" in summary
    html = (tmp_path / "token_weights.html").read_text()
    assert html.startswith("<!doctype html>") and "DCE" in html


def test_inspection_works_for_an_imported_lamp_store(device, experts, tmp_path):
    records = [
        {"id": f"r{i}", "user_id": "u1", "input": f"Write about item {i}", "output": f"Item {i} is lovely, truly.",
         "profile": [{"id": f"p{j}", "text": f"Old review {j}, truly lovely."} for j in range(3)]}
        for i in range(4)
    ]
    (tmp_path / "lamp.json").write_text(json.dumps(records))
    store = UserStore.open(import_lamp_json(tmp_path / "stores", tmp_path / "lamp.json")[0])
    summary = write_inspection(device, store, experts[0], WeightScheme(weighting="continuous"), tmp_path / "out")
    assert summary["targets"] == len(store.samples()) and summary["tokens"] > 0


def test_evaluation_reports_generation_metrics_nll_and_history_sensitivity(device, stores):
    device.train([stores[0]], TrainConfig(method="context-sft", **ONE_STEP), progress=False)
    row = device.evaluate(stores[0], uses_history=True, other_history=donor_history(stores[1]))
    for key in ("rouge1", "rougeL", "bleu", "nll", "history_sensitivity"):
        assert isinstance(row[key], float) and row[key] == row[key]
    assert row["generation"]["do_sample"] is False
    assert len(row["examples"]) == len(stores[0].samples("test"))


def test_compare_writes_the_run_directory(model_dir, stores, tmp_path):
    config = CompareConfig(base=BaseSpec(str(model_dir)), users=1, expert_users=2, prompt=PROMPT,
                           methods=("sft", "nextquill"), train=TrainConfig(**ONE_STEP))
    result = run_compare(stores, config, tmp_path / "run")
    assert set(result["summary"]) == {"base", "sft", "nextquill"}
    for name in ("config.json", "per_user.csv", "results.json", "summary.md", "summary.png"):
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "run" / "per_user.csv").read_text().count("\n") == 1 + 3


def test_cli_reports_user_errors_by_name_without_a_traceback(tmp_path, capsys):
    code = main(["train", "--users", str(tmp_path / "missing-user"), "--out", str(tmp_path / "a")])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing-user" in err and "Traceback" not in err


def test_cli_builds_users_trains_and_evaluates_an_adapter(model_dir, tmp_path, capsys):
    assert main(["users", "synthetic", "--max-users", "2", "--out", str(tmp_path / "users")]) == 0
    users = sorted(str(p) for p in (tmp_path / "users").iterdir())
    common = ["--model", str(model_dir), "--history-tokens", "48", "--response-tokens", "24"]
    assert main(["train", "--method", "context-sft", "--users", users[0], "--max-steps", "1",
                 "--out", str(tmp_path / "adapter"), *common]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--method", "context-sft", "--adapter", str(tmp_path / "adapter"),
                 "--users", *users, *common]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    per_user = [json.loads(line) for line in lines[: len(users)]]
    assert [row["user_id"] for row in per_user] == ["synthetic-user-00", "synthetic-user-01"]
    assert "macro_average" in json.loads("\n".join(lines[len(users):]))
