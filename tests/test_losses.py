"""The NextQuill math against float64 hand computations."""

import math

import pytest
import torch

from shared.losses import (
    IGNORE_INDEX,
    continuous_dce_weights,
    dce_weights,
    fused_nextquill_loss,
    nextquill_loss,
    token_probabilities,
)


def _hand_ce(logits_row, target):
    m = max(logits_row)
    log_z = m + math.log(sum(math.exp(v - m) for v in logits_row))
    return log_z - logits_row[target]


def test_dce_weights_are_high_only_above_delta():
    with_h = torch.tensor([0.50, 0.30, 0.20, 0.06, 0.9])
    without = torch.tensor([0.40, 0.30, 0.30, 0.00, 0.85])
    # DCE: 0.10, 0.0, -0.10, 0.06, 0.05 (not > delta)
    assert dce_weights(with_h, without).tolist() == pytest.approx([0.9, 0.1, 0.1, 0.9, 0.1])
    assert dce_weights(with_h, without, delta=0.07, high=2.0, low=0.5).tolist() == [2.0, 0.5, 0.5, 0.5, 0.5]


def test_continuous_weights_grow_linearly_with_positive_dce():
    w = continuous_dce_weights(torch.tensor([0.5, 0.2, 1.0]), torch.tensor([0.25, 0.4, 0.0]))
    assert w.tolist() == pytest.approx([0.1 + 0.8 * 0.25, 0.1, 0.9])


def test_dce_weights_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        dce_weights(torch.zeros(3), torch.zeros(4))


def test_nextquill_loss_matches_float64_hand_computation():
    torch.manual_seed(0)
    n, v = 7, 5
    logits_with = torch.randn(n, v, dtype=torch.float64)
    logits_without = torch.randn(n, v, dtype=torch.float64)
    labels = torch.tensor([1, 4, IGNORE_INDEX, 0, 2, IGNORE_INDEX, 3])
    weights = torch.tensor([0.9, 0.1, 123.0, 0.1, 0.9, 7.0, 0.1], dtype=torch.float64)
    alpha = 0.3

    total, l_n, l_p = nextquill_loss(logits_with, logits_without, labels, weights, alpha=alpha)

    kept = [i for i in range(n) if labels[i] != IGNORE_INDEX]
    w_sum = sum(weights[i].item() for i in kept)
    want_n = sum(weights[i].item() * _hand_ce(logits_with[i].tolist(), labels[i].item()) for i in kept) / w_sum
    mce = (logits_with - logits_without).tolist()
    want_p = sum(weights[i].item() * _hand_ce(mce[i], labels[i].item()) for i in kept) / w_sum
    assert l_n.item() == pytest.approx(want_n, rel=1e-6)
    assert l_p.item() == pytest.approx(want_p, rel=1e-6)
    assert total.item() == pytest.approx(want_n + alpha * want_p, rel=1e-6)


def test_unweighted_alignment_is_the_plain_mean_like_the_authors_code():
    torch.manual_seed(1)
    logits_with, logits_without = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([0, 1, 2, 3])
    weights = torch.tensor([0.9, 0.1, 0.1, 0.1])
    _, _, l_p = nextquill_loss(logits_with, logits_without, labels, weights, weighted_alignment=False)
    want = torch.nn.functional.cross_entropy(logits_with - logits_without, labels)
    assert l_p.item() == pytest.approx(want.item(), rel=1e-6)


def test_uniform_weights_give_plain_cross_entropy_and_no_alignment_without_alpha():
    torch.manual_seed(2)
    logits = torch.randn(5, 9)
    labels = torch.tensor([3, IGNORE_INDEX, 8, 0, 1])
    total, l_n, l_p = nextquill_loss(logits, None, labels, torch.ones(5), alpha=0.0)
    assert l_n.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert total.item() == l_n.item() and l_p.item() == 0.0


def test_nextquill_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no response tokens"):
        nextquill_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.full((2,), IGNORE_INDEX), torch.ones(2))
    with pytest.raises(ValueError, match="needs logits_without"):
        nextquill_loss(torch.zeros(2, 3), None, torch.tensor([0, 1]), torch.ones(2), alpha=0.1)
    with pytest.raises(ValueError, match="aligned"):
        nextquill_loss(torch.zeros(2, 3), torch.zeros(3, 3), torch.tensor([0, 1]), torch.ones(2))


def test_gradients_flow_through_both_passes_of_the_alignment_loss():
    logits_with = torch.randn(3, 4, requires_grad=True)
    logits_without = torch.randn(3, 4, requires_grad=True)
    total, _, _ = nextquill_loss(logits_with, logits_without, torch.tensor([0, 1, 2]), torch.ones(3))
    total.backward()
    assert logits_with.grad.abs().sum() > 0 and logits_without.grad.abs().sum() > 0


def test_token_probabilities_pick_the_label_and_zero_ignored():
    logits = torch.log(torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]))
    probs = token_probabilities(logits, torch.tensor([1, 0, IGNORE_INDEX]))
    assert probs.tolist() == pytest.approx([0.8, 0.6, 0.0])


@pytest.mark.parametrize(("alpha", "weighted_alignment"), [(0.3, True), (0.3, False), (0.0, True)])
def test_the_fused_loss_is_the_loss_of_the_head_applied_to_hidden_states_with_the_same_gradients(
        alpha, weighted_alignment):
    torch.manual_seed(0)
    n, d, v = 11, 6, 37
    head = torch.randn(v, d, dtype=torch.float64)
    leaves = [torch.randn(n, d, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    labels = torch.randint(0, v, (n,))
    labels[[0, 5]] = IGNORE_INDEX
    weights = torch.rand(n, dtype=torch.float64)

    def gradients(loss):
        grads = torch.autograd.grad(loss[0], leaves, allow_unused=True)
        return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves, strict=True)]

    # The reference: every token's logits of both passes, MCE their difference.
    want = nextquill_loss(leaves[0] @ head.T, leaves[1] @ head.T, labels, weights, alpha, weighted_alignment)
    # Chunks of 4 tokens: several chunks, the last one short, ignored tokens inside them.
    got = fused_nextquill_loss(leaves[0], leaves[1] if alpha else None, head, labels, weights, alpha,
                               weighted_alignment, chunk_tokens=4)
    for value, expected in zip(got, want, strict=True):
        torch.testing.assert_close(value, expected.float(), rtol=1e-6, atol=1e-7)
    for grad, expected in zip(gradients(got), gradients(want), strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-8)  # float32 cross-entropies


def test_the_fused_loss_refuses_a_head_of_another_width_and_a_missing_no_history_pass():
    hidden, labels, weights = torch.randn(3, 4), torch.tensor([1, 2, 3]), torch.ones(3)
    with pytest.raises(ValueError, match="does not map"):
        fused_nextquill_loss(hidden, hidden, torch.randn(9, 5), labels, weights)
    with pytest.raises(ValueError, match="needs hidden_without"):
        fused_nextquill_loss(hidden, None, torch.randn(9, 4), labels, weights, alpha=0.1)
