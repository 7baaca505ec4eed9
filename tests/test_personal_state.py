"""Personal parameters survive restarts and are never left half written."""

import os

import pytest
import torch

from client.personal_state import load_personal_state, personal_path, save_personal_state
from shared.user_store import UserStore
from simulations.datasets import build_synthetic_users


@pytest.fixture
def store(tmp_path):
    return UserStore.open(build_synthetic_users(tmp_path, n_users=1, samples_per_user=3)[0])


def test_personal_state_round_trips_through_the_store(store):
    personal = {"personal": {"layers.0.lora_A.weight": torch.randn(2, 4)}, "local": {"b": torch.ones(3)}}
    assert load_personal_state(store, "run-1") is None
    save_personal_state(store, "run-1", personal)
    loaded = load_personal_state(store, "run-1")
    assert loaded.keys() == personal.keys()
    assert all(torch.equal(loaded[a][k], v) for a, part in personal.items() for k, v in part.items())


def test_a_crash_while_writing_keeps_the_previous_state(store, monkeypatch):
    save_personal_state(store, "run-1", {"personal": {"w": torch.zeros(2)}})

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_personal_state(store, "run-1", {"personal": {"w": torch.ones(2)}})
    monkeypatch.undo()
    assert torch.equal(load_personal_state(store, "run-1")["personal"]["w"], torch.zeros(2))
    leftovers = [p.name for p in personal_path(store, "run-1").parent.iterdir()]
    assert leftovers == ["run-1.safetensors"]


def test_run_names_that_are_not_file_names_are_refused(store):
    with pytest.raises(ValueError, match="cannot name a file"):
        personal_path(store, "../elsewhere")


def test_a_corrupt_personal_file_is_a_clear_error(store):
    path = save_personal_state(store, "run-1", {"personal": {"w": torch.zeros(2)}})
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="unreadable"):
        load_personal_state(store, "run-1")


_SAVER = """
import sys, torch
from client.personal_state import save_personal_state
from shared.user_store import UserStore
store = UserStore.open(sys.argv[1])
version = 0
while True:
    version += 1
    save_personal_state(store, "run-1", {"personal": {"w": torch.full((1_000_000,), float(version))}})
    print(version, flush=True)
"""


def test_a_device_process_killed_while_saving_keeps_a_whole_personal_adapter(store):
    """A real process saving 4 MB personal states in a loop, killed with SIGKILL at a random
    moment, five times: each time the file on disk loads, whole, as the last version saved or
    the one being written; nothing half written is ever read."""
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(3)
    for _ in range(5):
        saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(store.path)], stdout=subprocess.PIPE, text=True,
                                 cwd=os.path.dirname(os.path.dirname(__file__)))
        finished = [int(saver.stdout.readline()) for _ in range(2)]  # at least two saves done
        time.sleep(rng.uniform(0.0, 0.05))
        saver.send_signal(signal.SIGKILL)
        rest, _ = saver.communicate(timeout=30)
        finished += [int(line) for line in rest.split()]
        loaded = load_personal_state(store, "run-1")["personal"]["w"]
        assert loaded.numel() == 1_000_000 and loaded.min() == loaded.max()
        assert int(loaded[0]) in (finished[-1], finished[-1] + 1)
