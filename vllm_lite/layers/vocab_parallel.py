"""The vocabulary split over the ranks: the token embedding and the lm_head each hold a contiguous range of rows.

The vocabulary is padded up to a multiple of the ranks (padding rows are zero and their logits are cut off), so
any vocabulary size splits. The embedding looks up the tokens of its range (zeros elsewhere) and all-reduces; the
lm_head's partial logits are all-gathered, so every rank holds the full logits and samples the same tokens (their
seeded generators and the global RNG start identical and draw in the same order).

With one rank these are nn.Embedding and nn.Linear unchanged (same kernels, no collective).
"""
from __future__ import annotations

import torch
from torch import nn

from vllm_lite.distributed import TPGroup, tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from vllm_lite.layers.linear import check_shape

_SINGLE = TPGroup()


class _VocabShard:
    """This rank's contiguous range of the (padded) vocabulary, and the loader that cuts it from the checkpoint."""

    def _shard_vocab(self, vocab_size: int, tp: TPGroup) -> int:
        """Sets the range; returns the rows per rank (the vocabulary padded up to a multiple of the ranks)."""
        per_rank = -(-vocab_size // tp.world_size)
        self.vocab_size, self.vocab_start = vocab_size, tp.rank * per_rank
        self.tp_size, self.tp_group = tp.world_size, tp.group_name
        self.padded = per_rank * tp.world_size != vocab_size
        return per_rank

    def _attach_loader(self) -> None:
        if self.tp_size > 1:
            self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.Tensor, tensor: torch.Tensor, shard_id: str | None = None) -> None:
        check_shape(tensor, (self.vocab_size, *param.shape[1:]))
        rows = max(0, min(param.shape[0], self.vocab_size - self.vocab_start))
        param.data.narrow(0, 0, rows).copy_(tensor.narrow(0, self.vocab_start, rows))
        param.data[rows:].zero_()


class VocabParallelEmbedding(_VocabShard, nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup | None = None) -> None:
        per_rank = self._shard_vocab(vocab_size, tp or _SINGLE)
        nn.Embedding.__init__(self, per_rank, hidden_size)
        self._attach_loader()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        out = nn.functional.embedding(torch.where(mine, local, 0), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return tensor_model_parallel_all_reduce(out, self.tp_group)


class ParallelLMHead(_VocabShard, nn.Linear):
    """hidden -> logits over the whole vocabulary; each rank scores its vocabulary range, the ranges are gathered."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup | None = None) -> None:
        per_rank = self._shard_vocab(vocab_size, tp or _SINGLE)
        nn.Linear.__init__(self, hidden_size, per_rank, bias=False)
        self._attach_loader()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(hidden)
        logits = tensor_model_parallel_all_gather(nn.functional.linear(hidden, self.weight), self.tp_size,
                                                  self.tp_group)
        return logits[..., : self.vocab_size].contiguous() if self.padded else logits
