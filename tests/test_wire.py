"""The shared parameters as they travel (shared/wire.py): one flat array in the layout the
message names, or one array per parameter; the same values either way."""

import pytest
import torch
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from shared.wire import PACKED, SHARED_KEYS, SHARED_SHAPES, SharedLayout

STATE = {
    "layers.0.q_proj.lora_A.shared.weight": torch.randn(8, 64),
    "layers.0.q_proj.lora_B.shared.weight": torch.randn(64, 8),
    "layers.1.q_proj.lora_A.shared.weight": torch.randn(8, 64),
    "layers.1.q_proj.lora_B.shared.weight": torch.randn(64, 8),
    "scalar": torch.tensor(3.0),
}


@pytest.mark.parametrize("packed", [True, False])
def test_the_shared_state_survives_the_trip_through_its_layouts_config(packed):
    layout = SharedLayout.of(STATE)
    received = SharedLayout.from_config(layout.to_config())
    record = layout.encode(STATE, "float32", packed)
    assert set(record) == ({PACKED} if packed else set(STATE))
    decoded = received.decode(record)
    assert list(decoded) == list(STATE)
    assert all(torch.equal(decoded[k], STATE[k]) for k in STATE)


def test_nothing_shared_travels_as_an_empty_record():
    layout = SharedLayout.of({})
    record = layout.encode({}, "float32")
    assert len(record) == 0 and SharedLayout.from_config(layout.to_config()).decode(record) == {}


def test_float16_travels_in_half_the_bytes_and_comes_back_as_float32():
    layout = SharedLayout.of(STATE)
    record = layout.encode(STATE, "float16")
    assert record[PACKED].numpy().nbytes * 2 == sum(v.numel() * 4 for v in STATE.values())
    decoded = layout.decode(record)
    assert all(decoded[k].dtype == torch.float32 and torch.allclose(decoded[k], STATE[k], atol=2e-3) for k in STATE)


def test_packed_the_record_is_a_handful_of_wire_objects_not_two_per_parameter():
    layout = SharedLayout.of(STATE)
    packed = get_all_nested_objects(layout.encode(STATE, packed=True))
    apart = get_all_nested_objects(layout.encode(STATE, packed=False))
    assert len(packed) == 3  # the record, its array, the array's one chunk
    assert len(apart) == 1 + 2 * len(STATE)
    assert sum(len(o.deflate()) for o in packed.values()) < sum(len(o.deflate()) for o in apart.values())


@pytest.mark.parametrize(
    ("record_state", "complaint"),
    [
        ({PACKED: torch.zeros(10)}, "packed shared parameters hold 10 values"),
        ({"layers.0.q_proj.lora_A.shared.weight": torch.zeros(8, 64)}, "not the layout's 5"),
    ],
)
def test_a_record_that_does_not_fit_the_layout_is_refused(record_state, complaint):
    from flwr.app import ArrayRecord

    with pytest.raises(ValueError, match=complaint):
        SharedLayout.of(STATE).decode(ArrayRecord(record_state))


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({SHARED_KEYS: ["a"]}, "lacks the shared layout's 'shared-shapes'"),
        ({SHARED_KEYS: ["a"], SHARED_SHAPES: ["2xq"]}, "not NxM"),
        ({SHARED_KEYS: ["a", "b"], SHARED_SHAPES: ["2"]}, "2 shared keys for 1 shapes"),
    ],
)
def test_a_message_whose_layout_is_malformed_is_refused(config, complaint):
    with pytest.raises(ValueError, match=complaint):
        SharedLayout.from_config(config)


def test_a_fresh_process_decodes_a_received_record_before_anything_imported_torch():
    # A deployed device's ClientApp process imports torch only when it trains or evaluates;
    # Flower's ArrayRecord converts to tensors only once torch is imported.
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import numpy as np, sys; from flwr.app import Array, ArrayRecord; import client.client_app; "
             "from shared.wire import PACKED, SharedLayout; assert 'torch' not in sys.modules; "
             "shared = SharedLayout(('a', 'b'), ((2, 3), (4,))).decode(ArrayRecord({PACKED: Array(np.arange(10.0))})); "
             "print({k: v.tolist() for k, v in shared.items()})")
    run = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "{'a': [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], 'b': [6.0, 7.0, 8.0, 9.0]}"
