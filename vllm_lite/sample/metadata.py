"""Per-step, batched sampling state: everything the Sampler needs, as tensors already on the logits' device.

The model runner builds one `SamplingMetadata` per step from the scheduled requests. Building is the only place
that walks Python lists; the Sampler itself is pure tensor work, so it can later be captured or fused on the GPU.
Flags (`all_greedy`, `no_penalties`, ...) are plain Python bools computed here so that the Sampler can skip whole
stages without reading tensors back from the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_lite.sampling_params import SamplingParams

# Exact-equality sentinels: a parameter equal to these is "off".
_NO_TOP_P = 1.0
_NO_MIN_P = 0.0


@dataclass
class SamplingMetadata:
    """Batched sampling parameters for one step (row i = i-th scheduled request that samples this step)."""

    # [B] float32; greedy rows hold 1.0 so that dividing by it is harmless (they never use it).
    temperature: torch.Tensor
    # [B] bool; True = greedy (temperature below SamplingParams' epsilon).
    is_greedy: torch.Tensor
    # [B] int64 (0 = off) / None when no row uses top-k.
    top_k: torch.Tensor | None
    # [B] float32 (1.0 = off) / None when no row uses top-p.
    top_p: torch.Tensor | None
    # [B] float32 (0.0 = off) / None when no row uses min-p.
    min_p: torch.Tensor | None
    # Largest top_k in the batch (0 when off) so top-k can use torch.topk without a device sync.
    max_top_k: int

    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool

    # Penalty inputs (None when no_penalties). Token id tensors are right-padded with vocab_size, an id that
    # scatters into a spare column dropped afterwards, so ragged lists become one rectangular tensor.
    prompt_token_ids: torch.Tensor | None  # [B, Lp] int64; None also when no row has a repetition penalty
    output_token_ids: torch.Tensor | None  # [B, Lo] int64
    repetition_penalty: torch.Tensor | None  # [B] float32 (1.0 = off)
    presence_penalty: torch.Tensor | None  # [B] float32 (0.0 = off)
    frequency_penalty: torch.Tensor | None  # [B] float32 (0.0 = off)

    # min_tokens blocking as a sparse (row, token) list: logits[rows, cols] = -inf. None when nothing is blocked.
    blocked_rows: torch.Tensor | None
    blocked_cols: torch.Tensor | None

    # Number of top logprobs to return (max over rows that asked); None = no row asked for logprobs.
    max_num_logprobs: int | None

    # Row index -> per-request generator (seeded random rows only). Unseeded rows share the global generator.
    generators: dict[int, torch.Generator] = field(default_factory=dict)

    # Optional [B, V] bool, True = allowed (grammar bitmask, expanded). Applied before anything else.
    logits_mask: torch.Tensor | None = None

    vocab_size: int = 0

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        stop_ids_blocked: list[set[int]],
        device: torch.device | str,
        vocab_size: int,
        logits_mask: torch.Tensor | None = None,
    ) -> SamplingMetadata:
        """Turn per-request Python state into batched device tensors (one host->device copy per tensor).

        `stop_ids_blocked[i]` holds EOS/stop ids to forbid because row i is still below its min_tokens (the
        model runner decides that; an empty set means nothing is blocked). `generators[i]` is the request's
        own generator when it was given a seed; it is used only if the row samples randomly.
        """
        n = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == len(stop_ids_blocked) == n):
            raise ValueError("SamplingMetadata.build: all per-request lists must have the same length")
        device = torch.device(device)
        pin = device.type == "cuda"

        def to_dev(data: list, dtype: torch.dtype) -> torch.Tensor:
            t = torch.tensor(data, dtype=dtype, pin_memory=pin)
            return t.to(device, non_blocking=pin)

        greedy = [p.greedy for p in params]
        temps = [1.0 if g else float(p.temperature) for p, g in zip(params, greedy)]
        all_greedy = all(greedy)
        all_random = not any(greedy)

        # Filtering only matters for random rows; greedy rows are neutralised so flags stay meaningful.
        top_k = [0 if g else int(p.top_k) for p, g in zip(params, greedy)]
        top_p = [_NO_TOP_P if g else float(p.top_p) for p, g in zip(params, greedy)]
        min_p = [_NO_MIN_P if g else float(p.min_p) for p, g in zip(params, greedy)]
        no_top_k = all(k == 0 or k >= vocab_size for k in top_k)
        no_top_p = all(x >= _NO_TOP_P for x in top_p)
        no_min_p = all(x <= _NO_MIN_P for x in min_p)

        rep = [float(p.repetition_penalty) for p in params]
        pres = [float(p.presence_penalty) for p in params]
        freq = [float(p.frequency_penalty) for p in params]
        no_penalties = all(r == 1.0 for r in rep) and all(x == 0.0 for x in pres) and all(x == 0.0 for x in freq)

        prompt_t = output_t = rep_t = pres_t = freq_t = None
        if not no_penalties:
            # The prompt only matters for repetition penalty; skip the (possibly long) copy otherwise.
            if any(r != 1.0 for r in rep):
                prompt_t = to_dev(_pad(prompt_token_ids, vocab_size), torch.int64)
            output_t = to_dev(_pad(output_token_ids, vocab_size), torch.int64)
            rep_t = to_dev(rep, torch.float32)
            pres_t = to_dev(pres, torch.float32)
            freq_t = to_dev(freq, torch.float32)

        rows: list[int] = []
        cols: list[int] = []
        for i, ids in enumerate(stop_ids_blocked):
            for t in ids:
                if 0 <= t < vocab_size:
                    rows.append(i)
                    cols.append(t)
        blocked_rows = to_dev(rows, torch.int64) if rows else None
        blocked_cols = to_dev(cols, torch.int64) if rows else None

        asked = [p.logprobs for p in params if p.logprobs is not None]
        max_num_logprobs = min(max(asked), vocab_size) if asked else None

        gens = {i: g for i, (g, is_g) in enumerate(zip(generators, greedy)) if g is not None and not is_g}

        if logits_mask is not None:
            if logits_mask.shape != (n, vocab_size) or logits_mask.dtype != torch.bool:
                raise ValueError(f"logits_mask must be bool [{n}, {vocab_size}], got {tuple(logits_mask.shape)} "
                                 f"{logits_mask.dtype}")
            logits_mask = logits_mask.to(device, non_blocking=True)

        return cls(
            temperature=to_dev(temps, torch.float32),
            is_greedy=to_dev(greedy, torch.bool),
            top_k=None if no_top_k else to_dev(top_k, torch.int64),
            top_p=None if no_top_p else to_dev(top_p, torch.float32),
            min_p=None if no_min_p else to_dev(min_p, torch.float32),
            max_top_k=0 if no_top_k else min(max(top_k), vocab_size),
            all_greedy=all_greedy,
            all_random=all_random,
            no_penalties=no_penalties,
            no_top_k=no_top_k,
            no_top_p=no_top_p,
            no_min_p=no_min_p,
            prompt_token_ids=prompt_t,
            output_token_ids=output_t,
            repetition_penalty=rep_t,
            presence_penalty=pres_t,
            frequency_penalty=freq_t,
            blocked_rows=blocked_rows,
            blocked_cols=blocked_cols,
            max_num_logprobs=max_num_logprobs,
            generators=gens,
            logits_mask=logits_mask,
            vocab_size=vocab_size,
        )


def _pad(seqs: list[list[int]], pad: int) -> list[list[int]]:
    """Right-pad ragged token lists with `pad` (at least one column so the tensor is never [B, 0]-shaped)."""
    width = max((len(s) for s in seqs), default=0) or 1
    return [list(s) + [pad] * (width - len(s)) for s in seqs]
