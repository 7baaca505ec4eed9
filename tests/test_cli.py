"""The command line as a new user meets it: a mistake gives one line naming what is wrong and
exit status 2, and leaves the disk as it was; an output is replaced only with --overwrite."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from shared.adapters import AdapterHost, save_adapter
from shared.config import BaseSpec, LoraSettings
from shared.loading import load_base
from shared.methods import METHODS
from simulations.cli import build_parser, main
from simulations.datasets import build_synthetic_users

SMALL = ["--device", "cpu", "--history-tokens", "32", "--context-tokens", "16", "--response-tokens", "16"]


def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def _fails(capsys, argv, message, code=2):
    """Run `nextquill argv`; it must end with `code` and one stderr line holding `message`."""
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's own refusals
        status = stop.code
    err = capsys.readouterr().err.strip()
    assert status == code
    assert message in err.splitlines()[-1], err
    assert "Traceback" not in err
    return err


@pytest.fixture
def workspace(tmp_path, model_dir):
    users = build_synthetic_users(tmp_path / "users", n_users=2, samples_per_user=8)
    return tmp_path, users, ["--model", str(model_dir), *SMALL]


@pytest.fixture(scope="module")
def expert(tmp_path_factory, model_dir):
    """A ContextSFT adapter trained by the command line itself (one step)."""
    root = tmp_path_factory.mktemp("expert")
    users = build_synthetic_users(root / "users", n_users=1, samples_per_user=8)
    assert main(["train", "--method", "context-sft", "--users", str(users[0]), "--out", str(root / "expert"),
                 "--max-steps", "1", "--model", str(model_dir), *SMALL]) == 0
    return root / "expert"


def test_train_refuses_an_out_that_is_a_user_store_and_changes_nothing(capsys, workspace):
    tmp_path, users, model = workspace
    before = _tree(tmp_path)
    _fails(capsys, ["train", "--method", "context-sft", "--users", str(users[0]), "--out", str(users[1]), *model],
           f"{users[1]} already holds a folder with files that this command did not write; choose another path, "
           "or pass --overwrite")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_train_never_writes_over_what_it_reads_even_with_overwrite(capsys, workspace, expert, overwrite):
    tmp_path, users, model = workspace
    before, expert_before = _tree(tmp_path), _tree(expert)
    _fails(capsys, ["train", "--users", str(users[0]), "--expert", str(expert), "--out", str(expert), *overwrite,
                    *model], f"--out {expert} is --expert {expert}, which this command reads")
    _fails(capsys, ["train", "--method", "sft", "--users", str(users[0]), "--out", str(users[0]), *overwrite,
                    *model], f"--out {users[0]} is --users {users[0]}")
    _fails(capsys, ["train", "--method", "sft", "--users", str(users[0]), "--out", str(tmp_path / "users"),
                    *overwrite, *model], f"--out {tmp_path / 'users'} holds --users {users[0]}")
    assert _tree(tmp_path) == before and _tree(expert) == expert_before


def test_train_replaces_a_file_only_with_overwrite_and_leaves_no_debris(capsys, workspace):
    tmp_path, users, model = workspace
    target = tmp_path / "runs" / "adapter"
    target.parent.mkdir()
    target.write_text("my notes")
    argv = ["train", "--method", "sft", "--users", str(users[0]), "--out", str(target), "--max-steps", "1", *model]
    _fails(capsys, argv, f"{target} already holds a file")
    assert target.read_text() == "my notes"
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]
    assert (target / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--alpha", "nan"], "argument --alpha: must be a finite number, got nan"),
        (["--learning-rate", "inf"], "argument --learning-rate: must be a finite number, got inf"),
        (["--max-steps", "0"], "argument --max-steps: must be at least 1, got 0"),
        (["--max-steps", "-1"], "argument --max-steps: must be at least 1, got -1"),
        (["--delta", "1.5"], "argument --delta: must be at most 1.0, got 1.5"),
        (["--delta", "-1.5"], "argument --delta: must be at least -1.0, got -1.5"),
        (["--weight-high", "1.2"], "argument --weight-high: must be at most 1.0, got 1.2"),
        (["--weight-low", "0.95"], "weight-low (ε) = 0.95 must not exceed weight-high (λ) = 0.9"),
        (["--device", "foo"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'foo'"),
        (["--batch-size", "eight"], "argument --batch-size: must be a whole number, got 'eight'"),
        (["--max-steps", "99999999999999999999"], "argument --max-steps: must be at most 2,147,483,647 in size"),
        (["--epochs", "1e300"], "argument --epochs: must be at most 1000000.0, got 1e+300"),
        (["--seed", "-3"], "argument --seed: must be at least 0, got -3"),
        (["--lora-r", "99999999999999999999"], "argument --lora-r: must be at most 2,147,483,647 in size"),
    ],
)
def test_bad_values_are_refused_naming_the_flag_before_anything_is_written(capsys, workspace, option, message):
    tmp_path, users, model = workspace
    before = _tree(tmp_path)
    _fails(capsys, ["train", "--method", "sft", "--users", str(users[0]), "--out", str(tmp_path / "out"), *model,
                    *option], message)
    assert _tree(tmp_path) == before


@pytest.fixture
def broken_models(tmp_path, model_dir):
    models = {}
    for name in ("no-weights", "bad-config", "corrupt-weights"):
        models[name] = tmp_path / "models" / name
        shutil.copytree(model_dir, models[name])
    (models["no-weights"] / "model.safetensors").unlink()
    (models["bad-config"] / "config.json").write_text("{not json")
    weights = models["corrupt-weights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return models


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no-weights", "cannot be loaded: Error no file named model.safetensors"),
        ("bad-config", "config.json' is not a valid JSON file"),
        ("corrupt-weights", "cannot be loaded: Error while deserializing header"),
    ],
)
def test_a_broken_model_folder_gives_one_line_naming_it(capsys, workspace, broken_models, name, message):
    tmp_path, users, _ = workspace
    out = tmp_path / "out"
    err = _fails(capsys, ["train", "--method", "sft", "--users", str(users[0]), "--out", str(out), "--model",
                          str(broken_models[name]), *SMALL], message)
    assert f"base model {broken_models[name]}" in err and not out.exists()


def test_an_adapter_made_for_another_base_or_corrupt_is_refused_in_one_line(capsys, workspace, expert, tmp_path,
                                                                            model_dir):
    _, users, model = workspace
    recorded = tmp_path / "recorded-other-base"
    shutil.copytree(expert, recorded)
    metadata = json.loads((recorded / "nextquill.json").read_text())
    (recorded / "nextquill.json").write_text(json.dumps({**metadata, "base": "0123456789abcdef"}))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(expert, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    # An adapter saved for another base without our metadata: told by its layers' shapes.
    other_dir = tmp_path / "other-model"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, other_dir)
    other_base, _ = load_base(BaseSpec(str(other_dir), device="cpu"))
    unmarked = tmp_path / "unmarked"
    save_adapter(AdapterHost(other_base, LoraSettings()).new("local"), unmarked, adapter_name="local")
    before = _tree(users[0])
    for adapter, message in ((recorded, "was trained on another base (fingerprint 0123456789abcdef)"),
                             (corrupt, "cannot be loaded on this base: Error while deserializing header"),
                             (unmarked, "its layers' shapes differ from this base's")):
        _fails(capsys, ["evaluate", "--adapter", str(adapter), "--users", str(users[0]), *model],
               f"adapter {adapter} {message}" if adapter is recorded else message)
        _fails(capsys, ["train", "--users", str(users[0]), "--expert", str(adapter), "--out", str(tmp_path / "o"),
                        "--max-steps", "1", *model], message)
    assert not (tmp_path / "o").exists() and _tree(users[0]) == before  # not even a cache folder


def test_other_mistakes_get_one_line(capsys, tmp_path):
    regular = tmp_path / "regular"
    regular.write_text("mine")
    _fails(capsys, ["users", "lamp-json"], "users lamp-json needs --records FILE")
    _fails(capsys, ["certs", "--out", str(regular / "certs")], f"{regular} is a file, not a folder")
    _fails(capsys, ["keys", "device-1", "--out", str(regular / "keys")], f"{regular} is a file, not a folder")
    assert regular.read_text() == "mine"


def test_certificates_and_keys_that_are_not_ours_are_kept_unless_overwrite(capsys, tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "device-1.key").write_text("the operator's own key")
    _fails(capsys, ["keys", "device-1", "--out", str(tmp_path / "keys")],
           "device-1.key already holds a file that is not part of a matching SuperNode key pair")
    assert (tmp_path / "keys" / "device-1.key").read_text() == "the operator's own key"
    assert not (tmp_path / "keys" / "device-1.pub").exists()
    assert main(["certs", "--out", str(tmp_path / "certs")]) == 0
    before = _tree(tmp_path / "certs")
    _fails(capsys, ["certs", "--out", str(tmp_path / "certs"), "--hosts", "superlink.example.org"],
           "ca.crt already holds a file that is not part of a sound development set for superlink.example.org")
    assert _tree(tmp_path / "certs") == before
    assert main(["certs", "--out", str(tmp_path / "certs"), "--hosts", "superlink.example.org", "--overwrite"]) == 0
    assert _tree(tmp_path / "certs") != before


def test_weights_and_compare_refuse_existing_outputs_before_any_work(capsys, workspace, expert):
    tmp_path, users, model = workspace
    (users[0] / "inspection").mkdir()
    (users[0] / "inspection" / "notes.txt").write_text("mine")
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "results.json").write_text("{}")
    before = _tree(tmp_path)
    _fails(capsys, ["weights", "--user", str(users[0]), "--expert", str(expert), *model],
           f"{users[0] / 'inspection'} already holds a folder with files")
    _fails(capsys, ["compare", "--run-dir", str(tmp_path / "compare"), "--users-dir", str(tmp_path / "new-users"),
                    *model], f"{tmp_path / 'compare'} already holds a folder with files")
    assert _tree(tmp_path) == before


def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "simulations.cli", "--data-dir", str(tmp_path), "users", "lamp-json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip() == "nextquill users: error: users lamp-json needs --records FILE (a LaMP-style JSON " \
                                 "file of input, output, profile)"


def test_cli_offers_every_method_of_the_trainer():
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("train", "evaluate"):
        method = next(a for a in commands[command]._actions if a.dest == "method")
        assert method.choices == tuple(METHODS) and method.default == "nextquill"
    methods = next(a for a in commands["compare"]._actions if a.dest == "methods")
    assert methods.choices == tuple(METHODS)


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


def test_a_store_given_twice_is_refused_before_anything_is_written(capsys, workspace, monkeypatch):
    tmp_path, users, model = workspace
    before = _tree(tmp_path)
    _fails(capsys, ["train", "--method", "sft", "--users", str(users[0]), str(users[0]), "--out",
                    str(tmp_path / "out"), *model], f"--users names the store {users[0]} twice")
    monkeypatch.chdir(users[0].parent)
    _fails(capsys, ["evaluate", "--users", str(users[0]), f"./{users[0].name}", *model],
           f"--users names the store {users[0]} twice ({users[0]} and ./{users[0].name})")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(("option", "message"), [
    (["--max-users", "0"], "argument --max-users: must be at least 1, got 0"),
    (["--max-users", "99999999999999999999"], "argument --max-users: must be at most 2,147,483,647 in size"),
    (["--min-samples", "-1"], "argument --min-samples: must be at least 1, got -1"),
    (["--seed", "2147483648"], "argument --seed: must be at most 2,147,483,647 in size, got 2147483648"),
])
def test_bad_counts_of_an_import_are_refused_naming_the_flag(capsys, tmp_path, option, message):
    _fails(capsys, ["--data-dir", str(tmp_path / "data"), "users", "synthetic", "--out", str(tmp_path / "u"), *option],
           message)
    assert not (tmp_path / "u").exists()
