"""Batches of encoded samples, laid out so that logits are needed only at the end.

Every row is left-padded, so each row's response ends at the last position. The R
response tokens of a batch (R = the longest response) are then predicted by the last
R + 1 positions, in both the with-history and the no-history batch: transformers'
`logits_to_keep=R + 1` computes the LM head there only, never over the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared.losses import IGNORE_INDEX
from shared.prompts import EncodedSample


@dataclass
class SideBatch:
    """One prompt variant of a batch: ids [B, T] left-padded, mask [B, T], positions [B, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device: torch.device | str) -> SideBatch:
        return SideBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids)))


@dataclass
class PairBatch:
    """A batch in both variants plus the response labels [B, R] (right-aligned, IGNORE_INDEX
    where a row's response is shorter than R)."""

    with_history: SideBatch
    without_history: SideBatch
    labels: torch.Tensor

    @property
    def response_length(self) -> int:
        return self.labels.shape[1]

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.with_history.to(device), self.without_history.to(device), self.labels.to(device))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> SideBatch:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    # Positions count real tokens only, so left padding does not shift them.
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    return SideBatch(ids, mask, positions)


def collate(samples: Sequence[EncodedSample], pad_id: int) -> PairBatch:
    """Stack encoded samples into a PairBatch."""
    longest = max(len(s.response) for s in samples)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(samples):
        labels[row, longest - len(s.response) :] = torch.tensor(s.response, dtype=torch.long)
    return PairBatch(
        with_history=left_pad([s.prompt_with + s.response for s in samples], pad_id),
        without_history=left_pad([s.prompt_without + s.response for s in samples], pad_id),
        labels=labels,
    )
