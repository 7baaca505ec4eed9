"""The coordinator's checkpoint round-trips in one file and names what is wrong when it cannot be read."""

import pytest
import torch

from coordinator.checkpoint import CHECKPOINT_FILE, Checkpoint, load_checkpoint, save_checkpoint


def test_checkpoint_round_trips_state_and_metadata_in_one_file(tmp_path):
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, Checkpoint("personalize", 2, "run-1", "ab" * 32, {"x.lora_A.weight": torch.ones(2, 3)}))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]
    loaded = load_checkpoint(tmp_path)
    assert (loaded.phase, loaded.round, loaded.run_id, loaded.expert_digest) == ("personalize", 2, "run-1", "ab" * 32)
    assert torch.equal(loaded.shared["x.lora_A.weight"], torch.ones(2, 3))


@pytest.mark.parametrize("garbage", [b"\x00\x01", b"\x10" + b"\x00" * 7 + b"{not json"])
def test_an_unreadable_checkpoint_is_a_clear_error(tmp_path, garbage):
    save_checkpoint(tmp_path, Checkpoint("expert", 1, "run-1", None, {"w": torch.zeros(1)}))
    (tmp_path / CHECKPOINT_FILE).write_bytes(garbage)
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_unknown_phase_is_rejected():
    with pytest.raises(ValueError, match="phase"):
        Checkpoint("warmup", 0, "run-1")
