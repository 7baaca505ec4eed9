"""A device with a resident base (client/device.py) on a small random model: the expert's
DCE cache, and every method training and saving a PEFT adapter."""

import json

import pytest
import torch

from client.reference import References
from client.token_weights import cached_token_probs
from shared.config import TrainConfig
from shared.methods import METHODS
from tests.samples import DEVICE_PROMPT, ONE_STEP


def test_expert_probabilities_are_cached_by_digest_and_a_changed_expert_invalidates_them(user_device, user_stores,
                                                                                           experts):
    store = user_stores[0]
    first, second = experts
    assert first.digest != second.digest
    probs = user_device.expert_probs(store, first, "removed")
    assert set(probs) == {s.id for s in store.samples("train")}
    cache_files = list((store.cache_dir / "token_probs").glob("*.json"))
    assert len(cache_files) == 1 and first.digest in cache_files[0].read_text()
    # A second call is served from the cache: the expert is not even loaded.
    def no_expert():
        raise AssertionError("the cache should have answered")

    assert cached_token_probs(store, no_expert, user_device.tokenizer, first.digest, user_device.base_id,
                              DEVICE_PROMPT, References("removed")) == probs
    # Another expert: recomputed, and the stale cache is gone.
    other = user_device.expert_probs(store, second, "removed")
    assert other != probs
    cache_files = list((store.cache_dir / "token_probs").glob("*.json"))
    assert len(cache_files) == 1 and second.digest in cache_files[0].read_text()
    for p in other.values():
        assert len(p.token_ids) == len(p.prob_with) == len(p.prob_without)
        assert all(0.0 <= v <= 1.0 for v in p.prob_with + p.prob_without)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_saves_a_peft_adapter(user_device, user_stores, experts, method, tmp_path):
    report = user_device.train([user_stores[0]], TrainConfig(method=method, **ONE_STEP), experts[0],
                               save_to=tmp_path / "a", progress=False)
    assert report.steps == 1 and torch.isfinite(torch.tensor(report.loss)).all()
    meta = json.loads((tmp_path / "a" / "nextquill.json").read_text())
    assert meta["method"] == method and meta["users"] == [user_stores[0].user_id]
    # Only methods with an alignment term report L_p.
    assert (report.l_p[0] > 0) == METHODS[method].aligns_effects


def test_methods_with_expert_weights_refuse_to_train_without_an_expert(user_device, user_stores):
    with pytest.raises(ValueError, match="needs an expert"):
        user_device.train([user_stores[0]], TrainConfig(method="nextquill", **ONE_STEP), None, progress=False)


def test_authors_variant_trains_without_an_expert(user_device, user_stores):
    config = TrainConfig(method="nextquill-authors", **ONE_STEP)
    assert user_device.train([user_stores[0]], config, None, progress=False).steps == 1


@pytest.mark.parametrize("method", ["nextquill", "mce-only"])
def test_lean_memory_gives_the_same_gradients_on_the_4bit_device(user_device, user_stores, experts, method):
    from client.trainer import choose_step, right_aligned
    from shared.batching import collate

    config = TrainConfig(method=method, **ONE_STEP)
    examples = user_device.examples([user_stores[0]], config, experts[0])[:4]
    model = user_device.host.new("lean-check", seed=3)
    model.train()
    batch = collate([e.encoded for e in examples], user_device.tokenizer.pad_token_id)
    probs = None
    if config.needs_expert:  # the expert's real token probabilities
        probs = (right_aligned([e.expert_probs.prob_with for e in examples], batch.response_length),
                 right_aligned([e.expert_probs.prob_without for e in examples], batch.response_length))
    grads = []
    for lean in (False, True):
        model.zero_grad(set_to_none=True)
        _, _, l_p = choose_step(TrainConfig(method=method, lean_memory=lean, **ONE_STEP), model)(batch, probs)
        assert l_p > 0
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.eval()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
