"""The counterfactual history h_ref (client/reference.py): each choice builds the prompt it
promises, the expert's generic texts are generated once and cached on the device, donors are
averaged and refused outside a simulation, and the weight settings act as documented."""

import dataclasses

import pytest
import torch

from client.reference import References, donor_stores, generic_texts, item_inputs
from client.token_weights import TokenProbs, cached_token_probs, user_weight_scheme
from shared.config import TrainConfig, WeightScheme
from shared.losses import token_weights
from shared.prompts import EMPTY_HISTORY_PLACEHOLDER
from shared.run_config import RunConfig
from tests.samples import ONE_STEP


def _decode(device, ids):
    return device.tokenizer.decode(ids)


def test_each_reference_puts_its_own_history_in_the_counterfactual_prompt(user_device, user_stores, experts):
    store, others = user_stores[0], user_stores[1:]
    sample = store.samples("train")[-1]
    own = [h.text for h in store.history_for(sample)]
    assert own, "the latest training sample sees earlier samples"

    removed = user_device.encoded(store, references=References("removed"))[-1][1]
    assert "History" not in _decode(user_device, removed.prompt_without)
    placeholder = user_device.encoded(store, references=References("placeholder"))[-1][1]
    assert EMPTY_HISTORY_PLACEHOLDER in _decode(user_device, placeholder.prompt_without)

    generic = user_device.references("generic", store, experts[0])
    text = _decode(user_device, user_device.encoded(store, references=generic)[-1][1].prompt_without)
    assert generic.generic[sample.history_ids[-1]].strip()[:10] in text
    assert own[0] not in text  # the user's own words are gone from the counterfactual

    donors = References("donors", donors=others)
    histories = donors.histories(store, sample)
    assert len(histories) == len(others) and all(h and not set(h) & set(own) for h in histories)
    # All variants end in the same response tokens, so the effects are aligned token for token.
    for references in (References("removed"), generic, donors):
        encoded = user_device.encoded(store, references=references)[-1][1]
        assert encoded.response == removed.response and encoded.prompt_with == removed.prompt_with


def test_generic_texts_are_generated_once_per_expert_and_cached_on_the_device(user_device, user_stores, experts):
    store = user_stores[1]
    first = user_device.references("generic", store, experts[0]).generic
    assert set(first) == {item.id for item in store.history()} and all(t.strip() for t in first.values())
    # Items answering the same input get the same text: the expert's, not the user's.
    inputs = item_inputs(store)
    assert all(first[a] == first[b] for a in first for b in first if inputs[a] == inputs[b])

    def no_expert():
        raise AssertionError("the cache should have answered")

    again = generic_texts(store, no_expert, user_device.tokenizer, experts[0].digest, user_device.base_id,
                          user_device.prompt)
    assert again == first
    user_device.references("generic", store, experts[1])  # another expert: a new cache replaces the old
    assert len(list((store.cache_dir / "generic_history").glob("*.json"))) == 1


def test_the_donors_dce_averages_the_donors_probabilities(user_device, user_stores, experts):
    store, others = user_stores[0], list(user_stores[1:])
    mean = user_device.expert_probs(store, experts[0], "donors", others)
    single = [user_device.expert_probs(store, experts[0], "donors", [donor]) for donor in others]
    for sample_id, probs in mean.items():
        assert probs.prob_with == pytest.approx(single[0][sample_id].prob_with)
        expected = [sum(column) / len(others) for column in zip(*(s[sample_id].prob_without for s in single),
                                                                strict=True)]
        assert probs.prob_without == pytest.approx(expected, abs=1e-6)


def test_a_cache_of_another_reference_is_not_reused(user_device, user_stores, experts):
    store = user_stores[2]
    removed = user_device.expert_probs(store, experts[0], "removed")
    placeholder = user_device.expert_probs(store, experts[0], "placeholder")
    assert any(removed[k].prob_without != placeholder[k].prob_without for k in removed)
    assert all(removed[k].prob_with == pytest.approx(placeholder[k].prob_with) for k in removed)


def test_donors_are_refused_without_other_users():
    with pytest.raises(ValueError, match="simulation"):
        References("donors")
    with pytest.raises(ValueError, match="at least two users"):
        donor_stores(["only"], 0)
    assert donor_stores(["a", "b", "c", "d", "e"], 4) == ["a", "b", "c"]


def test_a_deployed_device_refuses_the_donors_reference(tmp_path):
    from client.node_store import simulation_donors

    with pytest.raises(ValueError, match="simulations only"):
        simulation_donors({"user-dir": str(tmp_path)}, RunConfig())


def test_the_generic_reference_needs_an_expert_even_for_mce_only(user_device, user_stores):
    config = TrainConfig(method="mce-only", mce_reference="generic", **ONE_STEP)
    assert config.needs_expert and not config.spec.needs_expert
    with pytest.raises(ValueError, match="needs an expert"):
        user_device.train([user_stores[0]], config, None, progress=False)
    with pytest.raises(ValueError, match="needs an expert"):
        RunConfig.from_flower({"train.method": "mce-only", "train.mce-reference": "generic", "expert.rounds": 0})


def test_mce_only_against_the_generic_history_trains_with_the_expert_texts(user_device, user_stores, experts):
    config = TrainConfig(method="mce-only", mce_reference="generic", **ONE_STEP)
    report = user_device.train([user_stores[0]], config, experts[0], progress=False)
    assert report.steps == 1 and report.l_p[0] > 0


def test_the_fraction_rule_gives_that_share_of_a_users_tokens_the_high_weight():
    rng = torch.Generator().manual_seed(0)
    probs = [TokenProbs([1] * 20, torch.rand(20, generator=rng).tolist(), torch.rand(20, generator=rng).tolist())
             for _ in range(5)]
    scheme = user_weight_scheme(WeightScheme(weighting="fraction", keep_fraction=0.25), probs)
    assert scheme.weighting == "threshold" and -1.0 <= scheme.delta <= 1.0
    weights = torch.cat([token_weights(scheme, torch.tensor(p.prob_with), torch.tensor(p.prob_without))
                         for p in probs])
    assert (weights == scheme.weight_high).sum().item() == 25
    with pytest.raises(ValueError, match="per-user threshold"):
        token_weights(WeightScheme(weighting="fraction"), torch.ones(3), torch.zeros(3))


def test_the_weight_settings_are_run_config_keys():
    config = RunConfig.from_flower({"weights.delta": 0.2, "weights.weight-high": 1.0, "weights.weight-low": 0.0,
                                    "weights.weighting": "fraction", "weights.keep-fraction": 0.4,
                                    "weights.dce-reference": "removed", "train.mce-reference": "placeholder"})
    scheme = config.train_config("nextquill", 0).weight_scheme
    assert dataclasses.astuple(scheme) == ("removed", "fraction", 0.2, 1.0, 0.0, 0.4)
    assert config.train_config("nextquill", 0).mce_reference == "placeholder"
    for key, value, problem in (("weights.delta", 1.5, "at most 1"), ("weights.keep-fraction", 0.0, "greater than 0"),
                                ("weights.dce-reference", "nobody", "one of")):
        with pytest.raises(ValueError, match=f"run config {key}.*{problem}"):
            RunConfig.from_flower({key: value})


def test_one_cache_holds_every_reference_beside_the_shared_with_history_probabilities(user_device, user_stores,
                                                                                     experts):
    import json

    store = user_stores[0]

    def cached(kind, load):
        return cached_token_probs(store, load, user_device.tokenizer, experts[0].digest, user_device.base_id,
                                  user_device.prompt, References(kind))

    removed = cached("removed", lambda: user_device.load_adapter("expert", experts[0].path))
    placeholder = cached("placeholder", lambda: user_device.load_adapter("expert", experts[0].path))
    (cache,) = (store.cache_dir / "token_probs").glob("*.json")
    entries = json.loads(cache.read_text())["samples"]
    assert all({"removed", "placeholder"} <= set(entry["reference"]) for entry in entries.values())

    def no_expert():
        raise AssertionError("the cache should have answered")

    assert cached("removed", no_expert) == removed and cached("placeholder", no_expert) == placeholder


def test_methods_without_l_p_never_build_the_counterfactual_from_the_expert(user_device, user_stores):
    # The expert phase of a run whose mce-reference is generic trains ContextSFT, without an expert.
    config = TrainConfig(method="context-sft", mce_reference="generic", **ONE_STEP)
    assert not config.needs_expert
    assert user_device.train([user_stores[0]], config, None, progress=False).steps == 1
