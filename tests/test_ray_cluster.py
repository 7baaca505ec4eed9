"""A Flower simulation on a Ray cluster: a head and a worker node, each a `ray start` process of
its own on 127.0.0.1 (in a network namespace of its own, where the loopback is the only
interface), and our SuperLink's simulation attached to it through RAY_ADDRESS. The federation
runs ClientApps on both nodes and every round's metrics match the same run on one machine;
nothing listens beyond the loopback, and every process started is gone afterwards, also when
the command is stopped mid-run."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from simulations.benchmarks.cli import _run_config_overrides
from simulations.benchmarks.ray_cluster import RUNS, _record, compare_rounds
from simulations.operations.ray_cluster import private_loopback_unavailable
from tests.samples import small_run

REPO = Path(__file__).parents[1]
# What a run starts: Ray's servers and actors, Flower's SuperLink, SuperExec and simulation.
_STARTED = ("gcs_server", "raylet", "ClientAppActor", "flower-superlink", "flower-superexec", "flwr-simulation")


def _started_by(out: Path, before: set[int]) -> list[str]:
    """Live processes that were not there `before` and belong to a run into `out`: by their
    program, or by naming `out` in their command line or environment."""
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline", "environ", "status"], ad_value=None):
        if proc.info["pid"] in before or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        words = [proc.info["name"] or "", *(proc.info["cmdline"] or []), *(proc.info["environ"] or {}).values()]
        if any(program in word for word in words for program in (*_STARTED, str(out))):
            found.append(f"{proc.info['pid']} {' '.join(proc.info['cmdline'] or [])[:120]}")
    return found


def _actors() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name", "cmdline"], ad_value=None)
            if "ClientAppActor" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def _as_run_config_option(config: dict) -> str:
    """`config` as `--run-config` takes it, without the run directory (the benchmark gives each run its own)."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in config.items() if key != "federation.run-dir")


@pytest.mark.slow
def test_the_federation_on_a_two_node_ray_cluster_runs_clients_on_both_and_matches_one_machine(model_dir, tmp_path):
    reason = private_loopback_unavailable()
    if reason is not None:
        pytest.skip(f"no private network namespace on this machine: {reason}")
    config = small_run(model_dir, tmp_path / "unused", **{"users.dataset": "synthetic", "evaluate.every": 1,
                                                          "evaluate.base": False})
    overrides = _as_run_config_option(config)
    out = tmp_path / "bench"
    before = set(psutil.pids())
    done = subprocess.run([sys.executable, "-m", "simulations.benchmarks", "ray-cluster", "--run-config", overrides,
                           "--supernodes", "4", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "ray-cluster.json").read_text())

    assert result["runs"]["cluster"]["actors_per_node"] == {"head": 1, "worker-1": 1}  # one CPU each: one actor each
    addresses = [a for node in result["runs"]["cluster"]["listening"].values() for a in node]
    assert addresses and all(a.rsplit(":", 1)[0] in ("127.0.0.1", "::ffff:127.0.0.1") for a in addresses)
    # The same rounds, users and metrics: every user in every round, on one machine and on the cluster.
    rows = [json.loads(line) for line in (out / "cluster" / "run" / "rounds.jsonl").read_text().splitlines()]
    assert {(r["phase"], r["accepted"]) for r in rows} >= {("personalize", 4), ("evaluate", 4)}
    assert set(result["differences"]) >= {"train-loss", "eval-nll", "eval-rouge1", "upload_bytes_per_client"}
    assert result["largest_difference"] <= 1e-4, result["differences"]
    assert not _started_by(out, before)  # both nodes, the SuperLinks and all they started: stopped


def test_comparing_runs_names_the_metric_and_round_that_differ_and_ignores_times(tmp_path):
    # A round's training row and its periodic evaluation row share (phase, round): both are compared.
    rows = [{"phase": "personalize", "round": 1, "accepted": 2, "seconds": 3.0, "train-loss": 1.5},
            {"phase": "personalize", "round": 1, "accepted": 2, "seconds": 9.0, "eval-nll": float("nan")}]
    other = [dict(rows[0], seconds=7.0, **{"train-loss": 1.25}), dict(rows[1], seconds=1.0)]
    for name, content in (("a", rows), ("b", other)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in content))
    differences = compare_rounds(tmp_path / "a", tmp_path / "b")
    assert differences["train-loss"] == {"max_abs_difference": 0.25, "at": "personalize 1"}
    assert differences["eval-nll"]["max_abs_difference"] == 0.0  # NaN in both: the same
    assert differences["accepted"]["max_abs_difference"] == 0.0 and "seconds" not in differences
    (tmp_path / "c").write_text(json.dumps(rows[0]))  # the evaluation row missing
    with pytest.raises(ValueError, match="other rounds"):
        compare_rounds(tmp_path / "a", tmp_path / "c")


def test_the_benchmark_refuses_a_wrong_run_config_key_before_starting_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "simulations.benchmarks", "ray-cluster", "--run-config",
                           "federation.roundz=2", "--out", str(tmp_path / "b")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 2 and "federation.roundz" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("run_config", "named"), [("base.model=tiny", "key='text'"),
                                                   ("federation.rounds", "is not key=value"),
                                                   ("federation.rounds=1 two", "'two' is not key=value")])
def test_a_malformed_run_config_is_refused_naming_what_is_wrong(run_config, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        _run_config_overrides(run_config)
    assert _run_config_overrides("federation.rounds=1 base.model='a b'") == {"federation.rounds": 1,
                                                                              "base.model": "a b"}


@pytest.mark.slow
def test_sigterm_mid_run_stops_the_cluster_and_every_process_it_started(model_dir, tmp_path):
    reason = private_loopback_unavailable()
    if reason is not None:
        pytest.skip(f"no private network namespace on this machine: {reason}")
    config = small_run(model_dir, tmp_path / "unused", **{"users.dataset": "synthetic", "federation.rounds": 1})
    overrides = _as_run_config_option(config)
    del config["federation.run-dir"]
    out = tmp_path / "bench"
    # A finished one-machine run with these settings is kept (a rerun resumes), so the command goes
    # straight to the cluster.
    kept = out / RUNS[0]
    (kept / "run").mkdir(parents=True)
    (kept / "run" / "config.json").write_text("{}")
    (kept / "run" / "summary.json").write_text("{}")
    _record(kept, {"run_config": {**config, "federation.clients-per-round": 2, "federation.min-replies": 2},
                   "supernodes": 2, "nodes": 2, "cpus": 2, "seconds": 0.0})
    before = set(psutil.pids())
    bench = subprocess.Popen([sys.executable, "-m", "simulations.benchmarks", "ray-cluster", "--run-config", overrides,
                              "--supernodes", "2", "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    worker_log = out / "cluster" / "logs" / "ray-worker-1.log"
    deadline = time.monotonic() + 600
    while not (worker_log.is_file() and "Ray runtime started" in worker_log.read_text()):
        assert bench.poll() is None and time.monotonic() < deadline, "the cluster never came up"
        time.sleep(0.5)
    earlier_actors = _actors()
    while not _actors() - earlier_actors:  # a ClientApp on the cluster
        assert bench.poll() is None and time.monotonic() < deadline, "no ClientApp ran on the cluster"
        time.sleep(0.5)
    bench.send_signal(signal.SIGTERM)  # mid-run: the cluster, the SuperLink and the actors are all up
    _, stderr = bench.communicate(timeout=240)
    assert bench.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert not _started_by(out, before)
    assert not (out / "ray-cluster.json").exists()  # nothing reported for a run that did not finish


def test_a_finished_run_is_kept_on_a_rerun_with_the_same_settings_and_refused_with_others(tmp_path):
    from simulations.benchmarks.ray_cluster import _finished, _record, is_ray_cluster_folder

    asked = {"run_config": {"federation.rounds": 1}, "supernodes": 4, "cpus": 2}
    folder = tmp_path / "one-machine"
    assert _finished(folder, asked) is None and not is_ray_cluster_folder(tmp_path)
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "config.json").write_text("{}")
    assert is_ray_cluster_folder(tmp_path)
    _record(folder, {**asked, "seconds": 12.0})
    assert _finished(folder, asked) is None  # interrupted: no summary yet, so the rerun resumes it
    (folder / "run" / "summary.json").write_text("{}")
    assert _finished(folder, asked)["seconds"] == 12.0
    with pytest.raises(ValueError, match="other settings.*supernodes"):
        _finished(folder, {**asked, "supernodes": 8})
