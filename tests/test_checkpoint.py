"""The coordinator's checkpoint round-trips and names what is wrong when it cannot be read."""

import pytest
import torch

from coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint


def test_checkpoint_round_trips(tmp_path):
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, Checkpoint("personalize", 2, "ab" * 32, {"x.lora_A.weight": torch.ones(2, 3)}))
    loaded = load_checkpoint(tmp_path)
    assert (loaded.phase, loaded.round, loaded.expert_digest) == ("personalize", 2, "ab" * 32)
    assert torch.equal(loaded.shared["x.lora_A.weight"], torch.ones(2, 3))


def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, Checkpoint("expert", 1, None, {"w": torch.zeros(1)}))
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_unknown_phase_is_rejected():
    with pytest.raises(ValueError, match="phase"):
        Checkpoint("warmup", 0)
