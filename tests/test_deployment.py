"""A real deployment on loopback: a SuperLink and two SuperNodes as separate processes, TLS and
SuperNode authentication on, our apps run by `flwr run` over Flower's Fleet API (HTTP). One
expert round and one personalization round, securely aggregated; then each device holds its personal adapter and
the coordinator's checkpoint holds exactly the shared keys. Every process is stopped. And the
privacy audit at the wire: the same deployment with TLS off and a recording proxy in front of
the SuperLink, users' data marked with canaries."""

import contextlib
import json
import random
import shutil
import string
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from client.personal_state import load_personal_state, personal_path
from coordinator.checkpoint import load_checkpoint
from coordinator.global_adapters import GlobalAdapters
from shared.config import LoraSettings
from shared.split import EXPERT_SPLIT, PERSONAL_ADAPTER, SplitSpec
from shared.user_store import UserStore, write_user_store
from shared.wire import EVALUATE_METRICS, PACKED, QUERY_METRICS, TRAIN_METRICS
from simulations.datasets import build_synthetic_users
from simulations.operations.credentials import make_supernode_keys
from simulations.operations.deployment import DeploymentError, local_deployment, run_app
from simulations.operations.wire_audit import WireRecorder, leaks, pushed_replies, secret_forms
from tests.samples import small_run

REPO = Path(__file__).parents[1]


@pytest.mark.slow
def test_a_superlink_and_two_supernodes_run_securely_aggregated_rounds_across_a_coordinator_crash(
        model_dir, tmp_path):
    """Every training round under SecAgg+ (its key exchange through the SuperLink, its state kept
    by each SuperNode between ClientApp processes). The SuperLink and the ServerApp are killed
    once the expert is published (all their state lost, the run directory kept); a new
    deployment and the same `flwr run` resume after the last checkpoint: no round lost or
    trained twice, the same run id, and every device ends with its personal adapter and the
    expert in its cache."""
    users = build_synthetic_users(tmp_path / "users", n_users=2, samples_per_user=10)
    run_dir = tmp_path / "run"
    run_config = small_run(model_dir, run_dir, **{"federation.rounds": 1, "secagg.enabled": True})
    nodes = [{"user-dir": str(path)} for path in users]
    # Each device has its own data directory (its expert cache), as separate machines would.
    device_homes = [tmp_path / f"device-{i}" for i in range(len(users))]
    homes = [{"NEXTQUILL_HOME": str(home)} for home in device_homes]

    def kill_coordinator(deployment) -> bool:
        checkpoint = load_checkpoint(run_dir)
        if checkpoint is None or checkpoint.phase != "personalize":
            return False
        _kill(deployment, ("flower-superlink", "flwr-serverapp"))
        return True

    with local_deployment(tmp_path / "flwr-1", nodes, tmp_path / "certs", node_envs=homes) as deployment:
        watcher = _Watcher(kill_coordinator, deployment)
        watcher.start()
        with pytest.raises(DeploymentError):
            run_app(deployment, REPO, run_config, timeout=600)
        watcher.check()
    first = load_checkpoint(run_dir)
    assert (first.phase, first.round) == ("personalize", 0)

    with local_deployment(tmp_path / "flwr-2", nodes, tmp_path / "certs", node_envs=homes) as deployment:
        run = run_app(deployment, REPO, run_config, timeout=900)
    assert run.status == "finished:completed"
    assert deployment.live_processes() == []
    assert f"resuming {run_dir} at phase personalize after round 0" in run.output
    assert "[expert 1/1]" not in run.output  # the published expert was not trained again
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["round"]) for r in rows] == [("expert", 1), ("personalize", 1), ("evaluate", 1)]
    assert [r["accepted"] for r in rows[:2]] == [2, 2] and all("train-loss" in r for r in rows[:2])
    assert "Secure aggregation completed" in run.output

    checkpoint = load_checkpoint(run_dir)
    assert checkpoint.phase == "done" and checkpoint.run_id == first.run_id
    split = SplitSpec("dual")
    shared_keys = set(GlobalAdapters(str(model_dir), LoraSettings(lora_r=2, lora_alpha=4)).initial_shared(split, 0))
    assert set(checkpoint.shared) == shared_keys

    for path, home in zip(users, device_homes, strict=True):
        store = UserStore.open(path)
        assert personal_path(store, f"{checkpoint.run_id}-personalize").is_file()
        personal = load_personal_state(store, f"{checkpoint.run_id}-personalize")
        assert set(personal) == {PERSONAL_ADAPTER} and set(personal[PERSONAL_ADAPTER]) == shared_keys
        assert (home / "experts" / checkpoint.expert_digest / "adapter_model.safetensors").is_file()


CANARY = "canary-0d1e5f"


def _kill(deployment, marks: tuple[str, ...]) -> None:
    """SIGKILL the deployment's processes whose command line holds one of `marks`, and
    everything they started, as a crash would (processes gone meanwhile are skipped)."""
    for process in deployment.live_processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            if any(mark in " ".join(process.cmdline()) for mark in marks):
                for child in [*process.children(recursive=True), process]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()


def _rounds_text(run_dir: Path) -> str:
    path = run_dir / "rounds.jsonl"
    return path.read_text() if path.exists() else ""


class _Watcher(threading.Thread):
    """Runs `step(deployment)` every 0.2 s until it returns True or `stop` is set; an error in
    it is kept and raised again by `check()` in the test's thread."""

    def __init__(self, step, deployment) -> None:
        super().__init__(daemon=True)
        self.step, self.deployment, self.stop, self.error = step, deployment, threading.Event(), None

    def run(self) -> None:
        try:
            while not self.stop.is_set() and not self.step(self.deployment):
                time.sleep(0.2)
        except BaseException as error:  # noqa: BLE001  (handed to the test's thread)
            self.error = error

    def check(self) -> None:
        self.stop.set()
        self.join(timeout=60)
        if self.error is not None:
            raise self.error


@pytest.mark.slow
def test_a_run_asking_for_more_nodes_than_exist_with_a_failing_device_completes(model_dir, tmp_path):
    """Real processes: clients-per-round above the SuperNodes connected, and a device whose store
    is missing (a canary in its path). The run goes on with the nodes it has and completes; the
    failing device's error reaches the coordinator as a fixed category, its details only the
    device's own log. (A SuperNode lost mid-run: the killed-SuperNode test below.)"""
    users = build_synthetic_users(tmp_path / "users", n_users=2, samples_per_user=10)
    run_dir = tmp_path / "run"
    # The failing device fails at once; round-timeout only bounds the slow ones (a ClientApp process
    # loading the base on a busy machine took past 30 s once in nine runs: a flaky, not a finding).
    run_config = small_run(model_dir, run_dir, **{"train.method": "sft", "federation.rounds": 1,
        "federation.clients-per-round": 4, "federation.local-steps": 1, "federation.connect-timeout": 5.0,
        "federation.round-timeout": 120.0})
    nodes = [{"user-dir": str(users[0])}, {"user-dir": str(users[1])}, {"user-dir": str(tmp_path / CANARY)}]
    homes = [{"NEXTQUILL_HOME": str(tmp_path / f"device-{i}")} for i in range(3)]
    with local_deployment(tmp_path / "flwr", nodes, tmp_path / "certs", node_envs=homes) as deployment:
        started = time.monotonic()
        run = run_app(deployment, REPO, run_config, timeout=600)
        seconds = time.monotonic() - started
        logs = {name: path.read_text(errors="replace") for name, path in deployment.logs.items()}
    assert run.status == "finished:completed" and seconds < 600

    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["personalize", "evaluate"]
    assert (rows[0]["sampled"], rows[0]["accepted"]) == (3, 2)  # 3 connected of the 4 wanted; the canary device failed
    assert rows[1]["accepted"] == 2
    assert "3 SuperNode(s) connected, fewer than the 4 wanted: going on with them" in run.output
    assert "failed: device failed: user-store (details in the device's log)" in run.output
    assert CANARY not in run.output and CANARY not in logs["superlink"]
    assert CANARY in logs["supernode-2"]  # the details stayed on the device


def _canary_user(source: Path, target: Path, canaries: dict[str, str]) -> Path:
    """`source`'s store rewritten with a canary word in its user id, folder, every context,
    every target and every history item."""
    store = UserStore.open(source)
    samples = [replace(s, x=f"{s.x} {canaries['input']}", y=f"{s.y} {canaries['target']}") for s in store.samples()]
    seen = {item.id: item for sample in store.samples() for item in store.history_for(sample)}
    history = [replace(item, text=f"{item.text} {canaries['history']}") for item in seen.values()]
    write_user_store(target, f"user {canaries['user-id']}", store.meta["source"], samples, history)
    return target


def _token_ids(tokenizer, word: str) -> list[list[int]]:
    """The ids a device's tokenizer gives `word` alone and inside text (after a space)."""
    variants = [tokenizer.encode(form, add_special_tokens=False) for form in (word, f" {word}")]
    assert all(len(ids) >= 4 for ids in variants), "a canary of few tokens could match by chance"
    return variants


@pytest.mark.slow
def test_no_canary_of_a_users_data_crosses_the_wire_in_any_encoding(model_dir, tokenizer, tmp_path):
    """A SuperLink and three SuperNodes on loopback, with a recording proxy between them (TLS
    off for this test only). Two users' ids, folders, inputs, targets and histories carry
    canaries; a third device fails on a store whose path and bad record carry canaries. No
    canary crosses in UTF-8, UTF-16 or as token ids of 16, 32 or 64 bits, either byte order;
    the positive control (a run-config value the coordinator sends) is found in the same
    capture; and every reply holds only shared parameters and allow-listed metrics."""
    rng = random.Random(7)
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(14))  # noqa: E731
    secrets: dict[str, str] = {}
    users = build_synthetic_users(tmp_path / "built", n_users=2, samples_per_user=10)
    stores = []
    for index, built in enumerate(users):
        canaries = {site: word() for site in ("user-id", "folder", "input", "target", "history")}
        stores.append(_canary_user(built, tmp_path / "users" / f"store-{canaries['folder']}", canaries))
        secrets |= {f"user {index} {site}": value for site, value in canaries.items()}
    failing = {"folder": word(), "record": word()}
    secrets |= {f"failing device {site}": value for site, value in failing.items()}
    broken = tmp_path / "users" / f"store-{failing['folder']}"
    shutil.copytree(stores[0], broken)
    with open(broken / "samples.jsonl", "a", encoding="utf-8") as rows:
        rows.write(json.dumps({"id": failing["record"], "time": 99.0, "x": "", "y": 7, "split": "train",
                               "history_ids": [], "preference_spans": []}) + "\n")
    control = word()
    run_dir = tmp_path / f"run-{control}"
    run_config = small_run(model_dir, run_dir, **{"federation.rounds": 1, "federation.clients-per-round": 3,
                                                  "federation.connect-timeout": 30.0})
    nodes = [{"user-dir": str(path)} for path in [*stores, broken]]
    homes = [{"NEXTQUILL_HOME": str(tmp_path / f"device-{i}")} for i in range(len(nodes))]
    with WireRecorder() as recorder:
        with local_deployment(tmp_path / "flwr", nodes, tmp_path / "certs", node_envs=homes, tls=False,
                              supernode_route=recorder.forward_to) as deployment:
            run = run_app(deployment, REPO, run_config, timeout=900)
            failing_log = deployment.logs["supernode-2"].read_text(errors="replace")
        recorder.close()
        connections = recorder.connections
    assert run.status == "finished:completed"
    assert failing["folder"] in failing_log and failing["record"] in failing_log  # the error named them, locally

    forms = {name: secret_forms(value, _token_ids(tokenizer, value)) for name, value in secrets.items()}
    assert leaks(connections, forms) == []
    found = leaks(connections, {"control": secret_forms(control)}, direction="downstream")
    assert {leak.form for leak in found} >= {"utf-8"}  # the capture could see what the coordinator sent

    replies = pushed_replies(connections)
    lora = LoraSettings(lora_r=2, lora_alpha=4)
    adapters = GlobalAdapters(str(model_dir), lora)
    # A train reply is the shared parameters packed into one array: as many values as the
    # expert phase's or personalization's shared state, nothing more.
    shared_sizes = {sum(t.numel() for t in adapters.initial_shared(split, 0).values())
                    for split in (EXPERT_SPLIT, SplitSpec("dual"))}
    allowed = {"train": TRAIN_METRICS, "evaluate": EVALUATE_METRICS, "query": QUERY_METRICS}
    kinds = {reply.message_type for reply in replies}
    assert kinds == {"train", "evaluate", "query"}
    for reply in replies:
        if reply.error is not None:
            assert reply.error.reason == "device failed: user-store (details in the device's log)"
            continue
        records = dict(reply.content.items())
        assert set(records) <= {"arrays", "metrics"}
        assert set(records["metrics"]) <= allowed[reply.message_type]
        if "arrays" in records:
            assert reply.message_type == "train" and set(records["arrays"]) == {PACKED}
            assert records["arrays"][PACKED].numpy().size in shared_sizes
    assert sum(reply.error is not None for reply in replies) >= 2  # the failing device replied each round
    # And the capture saw what the devices sent up: the failing device's fixed reason, known
    # beforehand, is found in what it pushed (going down it is only in the app bundle's code).
    reason = {"reason": secret_forms("device failed: user-store")}
    assert any("/v1/fleet/push-messages) request body" in leak.where
               for leak in leaks(connections, reason, direction="upstream"))


@pytest.mark.slow
def test_a_killed_supernode_rejoins_with_its_identity_and_an_unregistered_one_is_refused(model_dir, tmp_path):
    """Real processes: supernode-1 (and its ClientApp) killed after the first personalization
    round, then started again with its registered key. It comes back under the same node id,
    takes part in the later rounds, and its personal adapter on disk is the one it goes on
    from (rewritten after the restart, never lost). Meanwhile a SuperNode with a key the
    operator never registered tries to join and is refused."""
    users = build_synthetic_users(tmp_path / "users", n_users=2, samples_per_user=10)
    run_dir = tmp_path / "run"
    run_config = small_run(model_dir, run_dir, **{"train.method": "sft", "federation.rounds": 4,
        "federation.local-steps": 1, "federation.connect-timeout": 60.0, "federation.round-timeout": 90.0,
        "evaluate.base": False})
    seen: dict[str, object] = {}

    def kill_and_restart(deployment) -> bool:
        if '"phase": "personalize", "round": 1' not in _rounds_text(run_dir):
            return False
        store = UserStore.open(users[1])
        seen["personal"] = personal_path(store, f"{load_checkpoint(run_dir).run_id}-personalize")
        seen["saved"] = seen["personal"].read_bytes()
        _kill(deployment, ("supernode-1.key",))
        # As a supervisor (systemd's Restart=on-failure) would: the SuperLink refuses the node
        # until it has timed out its old session (the SuperNode exits with code 305), so it is
        # started again until it stays up.
        for attempt in range(1, 40):
            started = time.time()
            process = deployment.start_supernode("supernode-1", log_name=f"supernode-1-again-{attempt}")
            try:
                process.wait(timeout=15)
                time.sleep(5)
            except subprocess.TimeoutExpired:  # still up: it was let in (and may have trained meanwhile)
                seen["restarted_at"] = started
                return True
        return True

    homes = [{"NEXTQUILL_HOME": str(tmp_path / f"device-{i}")} for i in range(2)]
    rogue = make_supernode_keys(tmp_path / "rogue-keys", ["rogue"])["rogue"]
    with local_deployment(tmp_path / "flwr", [{"user-dir": str(p)} for p in users], tmp_path / "certs",
                          node_envs=homes) as deployment:
        watcher = _Watcher(kill_and_restart, deployment)
        watcher.start()
        intruder = deployment.start_supernode("supernode-0", private_key=rogue.private_key, log_name="rogue")
        run = run_app(deployment, REPO, run_config, timeout=600)
        watcher.check()
        online = deployment.online_node_ids()
        rogue_log = deployment.logs["rogue"].read_text(errors="replace")
    # Flower's exit code 305: the SuperLink would not activate a node whose public key is unknown.
    assert intruder.wait(timeout=60) != 0 and "Failed to activate SuperNode" in rogue_log
    assert len(online) == 2
    assert run.status == "finished:completed" and "restarted_at" in seen
    assert deployment.node_ids["supernode-1"] in online  # the same identity as before the kill
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]

    personalize = [r for r in rows if r["phase"] == "personalize" and "aggregated" in r]
    assert personalize[-1]["accepted"] == 2  # back in the last round
    assert rows[-1]["phase"] == "evaluate" and rows[-1]["accepted"] == 2
    personal = seen["personal"]
    assert personal.stat().st_mtime > seen["restarted_at"] and personal.read_bytes() != seen["saved"]
