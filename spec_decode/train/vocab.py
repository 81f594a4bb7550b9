"""The draft vocabulary: the target tokens the head can propose, picked by how often the target produced them in the
training data, with the public checkpoints' mappings (`d2t`: target id = draft id + d2t[draft id]; `t2d`: a bool
mask over the target vocabulary)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DraftVocab:
    draft_ids: torch.Tensor  # [V_draft] target ids, ascending
    target_size: int

    @classmethod
    def from_counts(cls, counts: np.ndarray, size: int) -> "DraftVocab":
        """The `size` most frequent target tokens (ties: the lower id), or every token when size >= the vocabulary.
        Unseen tokens fill the rest, lowest ids first, so the draft vocabulary always has `size` entries."""
        size = min(int(size), len(counts))
        order = np.lexsort((np.arange(len(counts)), -counts.astype(np.int64)))
        return cls(torch.from_numpy(np.sort(order[:size]).astype(np.int64)), len(counts))

    @property
    def size(self) -> int:
        return int(self.draft_ids.numel())

    @property
    def d2t(self) -> torch.Tensor:
        return self.draft_ids - torch.arange(self.size)

    @property
    def t2d(self) -> torch.Tensor:
        mask = torch.zeros(self.target_size, dtype=torch.bool)
        mask[self.draft_ids] = True
        return mask

    def target_to_draft(self) -> torch.Tensor:
        """[V] draft index of each target id, -1 where the draft vocabulary lacks it (labels the head cannot hit)."""
        index = torch.full((self.target_size,), -1, dtype=torch.int64)
        index[self.draft_ids] = torch.arange(self.size)
        return index

    def coverage(self, counts: np.ndarray) -> float:
        """Share of the counted target tokens the draft vocabulary holds."""
        total = counts.sum()
        return float(counts[self.draft_ids.numpy()].sum() / total) if total else 1.0
