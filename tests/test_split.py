"""The shared / personal split decides, by parameter name alone, what may leave a device."""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from shared.adapters import lora_config
from shared.config import LoraSettings
from shared.split import SplitSpec


def _model(model_dir, spec: SplitSpec):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = lora_config(LoraSettings(lora_r=2, lora_alpha=4))
    names = spec.adapters
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    model.base_model.set_adapter(list(names))
    return model


def test_dual_split_shares_the_whole_shared_adapter_and_nothing_of_the_personal_one(model_dir):
    spec = SplitSpec("dual")
    model = _model(model_dir, spec)
    shared, personal = spec.shared_state(model), spec.personal_state(model)
    assert set(personal) == {"personal"}
    assert set(shared) == set(personal["personal"])  # same layout, different adapters
    assert all("lora_" in k for k in shared)


def test_a_shared_split_sends_only_lora_a(model_dir):
    spec = SplitSpec("a-shared")
    model = _model(model_dir, spec)
    shared, personal = spec.shared_state(model), spec.personal_state(model)["local"]
    assert shared and all(".lora_A." in k for k in shared)
    assert personal and all(".lora_B." in k for k in personal)


def test_layer_split_keeps_the_layers_near_the_output_personal(model_dir):
    spec = SplitSpec("layers", shared_layers=1)
    model = _model(model_dir, spec)
    shared, personal = spec.shared_state(model), spec.personal_state(model)["local"]
    assert shared and all(".layers.0." in k for k in shared)
    assert personal and all(".layers.1." in k for k in personal)


@pytest.mark.parametrize("spec", [SplitSpec("dual"), SplitSpec("a-shared"), SplitSpec("layers", shared_layers=1)])
def test_loading_shared_parameters_round_trips_and_leaves_personal_ones_alone(model_dir, spec):
    model = _model(model_dir, spec)
    personal_before = spec.personal_state(model)
    incoming = {k: torch.full_like(v, 0.5) for k, v in spec.shared_state(model).items()}
    spec.load_shared(model, incoming)
    assert all(torch.equal(v, incoming[k]) for k, v in spec.shared_state(model).items())
    after = spec.personal_state(model)
    assert all(torch.equal(after[a][k], v) for a, part in personal_before.items() for k, v in part.items())


def test_shared_parameters_with_other_keys_are_refused(model_dir):
    spec = SplitSpec("a-shared")
    model = _model(model_dir, spec)
    state = spec.shared_state(model)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="do not match the split"):
        spec.load_shared(model, state)


def test_unknown_split_kind_is_rejected():
    with pytest.raises(ValueError, match="split kind"):
        SplitSpec("everything")
    with pytest.raises(ValueError, match="shared_layers"):
        SplitSpec("layers")
