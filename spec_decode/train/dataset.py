"""Training batches from the shards of data.py: one shard in memory at a time, sequences of similar length padded
together up to a token budget, a deterministic order per (seed, epoch) so that a resumed run sees the same batches.
With `val_every` = N, every N-th sequence of each shard is held out of training for `val_batches` (the trainer's
held-out accuracy and acceptance estimate).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T] int64, 0-padded
    aux: torch.Tensor  # [B, T, 3H]
    labels: torch.Tensor  # [B, T] int64: the target's greedy token after each position
    loss_mask: torch.Tensor  # [B, T] bool


class ShardDataset:
    def __init__(self, data_dir: str, meta: dict, batch_tokens: int, seed: int, val_every: int = 0) -> None:
        self.data_dir = data_dir
        self.shards = meta["shards"]
        self.batch_tokens = batch_tokens
        self.seed = seed
        self.val_every = val_every
        self.batches_per_epoch = len(self.plan(0))
        self.num_val_sequences = sum(len(self._indices(s, held_out=True)) for s in range(len(self.shards)))

    def _indices(self, shard: int, held_out: bool) -> np.ndarray:
        """The shard's training (or held-out) sequence indices."""
        idx = np.arange(len(self.shards[shard]["seq_lens"]))
        if self.val_every <= 0:
            return idx[:0] if held_out else idx
        out = idx % self.val_every == self.val_every - 1
        return idx[out] if held_out else idx[~out]

    def _groups(self, shard: int, held_out: bool) -> list[np.ndarray]:
        idx = self._indices(shard, held_out)
        lens = np.asarray(self.shards[shard]["seq_lens"], dtype=np.int64)[idx]
        return [idx[g] for g in self._group(lens)] if len(idx) else []

    def _group(self, lens: np.ndarray) -> list[np.ndarray]:
        """Sequences by length, cut where count x longest would pass the token budget (one at least)."""
        order = np.argsort(lens, kind="stable")
        groups, start = [], 0
        for i in range(1, len(order) + 1):
            if i == len(order) or (i + 1 - start) * lens[order[i]] > self.batch_tokens:
                groups.append(order[start:i])
                start = i
        return groups

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(shard index, sequence indices) of every batch of an epoch, in order: shards shuffled, then the batches
        of each shard shuffled."""
        rng = np.random.default_rng([self.seed, epoch])
        plan = []
        for s in rng.permutation(len(self.shards)):
            groups = self._groups(int(s), held_out=False)
            plan += [(int(s), groups[i]) for i in rng.permutation(len(groups))]
        return plan

    def batches(self, epoch: int, skip: int, device: torch.device) -> Iterator[Batch]:
        """The epoch's batches after the first `skip`, on `device`."""
        return self._load(self.plan(epoch)[skip:], device)

    def val_batches(self, device: torch.device) -> Iterator[Batch]:
        """The held-out sequences' batches (none without val_every)."""
        return self._load([(s, g) for s in range(len(self.shards)) for g in self._groups(s, held_out=True)], device)

    def _load(self, plan: list[tuple[int, np.ndarray]], device: torch.device) -> Iterator[Batch]:
        loaded: tuple[int, dict[str, torch.Tensor]] | None = None
        for s, seqs in plan:
            if loaded is None or loaded[0] != s:
                loaded = None  # drop the previous shard before reading the next
                loaded = (s, load_file(os.path.join(self.data_dir, self.shards[s]["file"])))
            yield _pad(loaded[1], seqs, device)


def _pad(shard: dict[str, torch.Tensor], seqs: np.ndarray, device: torch.device) -> Batch:
    cu = shard["cu_seqlens"]
    starts, ends = cu[seqs], cu[seqs + 1]
    t = int((ends - starts).max())
    b = len(seqs)
    tokens = torch.zeros(b, t, dtype=torch.int64)
    aux = torch.zeros(b, t, shard["aux"].shape[1], dtype=shard["aux"].dtype)
    labels = torch.zeros(b, t, dtype=torch.int64)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for r, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        tokens[r, : e - s] = shard["tokens"][s:e]
        aux[r, : e - s] = shard["aux"][s:e]
        labels[r, : e - s] = shard["labels"][s:e]
        mask[r, : e - s] = shard["loss_mask"][s:e].bool()
    pin = device.type == "cuda"
    move = (lambda x: x.pin_memory().to(device, non_blocking=True)) if pin else (lambda x: x.to(device))
    return Batch(move(tokens), move(aux), move(labels), move(mask))
