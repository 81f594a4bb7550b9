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

    # allowed_token_ids as [B, V] bool, True = allowed (rows without a list are all True). None: no row has one.
    allowed_mask: torch.Tensor | None = None
    # logit_bias as a sparse (row, token, bias) list added to the logits. None: no row has a bias.
    bias_rows: torch.Tensor | None = None
    bias_cols: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None

    @property
    def no_token_constraints(self) -> bool:
        """No grammar mask, allowed ids, blocked (min_tokens, bad words) or biased tokens in this batch."""
        return (self.logits_mask is None and self.allowed_mask is None and self.blocked_rows is None
                and self.bias_rows is None)

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
        for i, p in enumerate(params):
            if p.bad_words_token_ids:
                for t in banned_by_bad_words(p.bad_words_token_ids, output_token_ids[i]):
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

        allowed_mask = None
        if any(p.allowed_token_ids for p in params):
            allowed_mask = _allowed_mask(params, vocab_size, device)
        bias_rows = bias_cols = bias_values = None
        biased = [(i, t, float(b)) for i, p in enumerate(params) if p.logit_bias
                  for t, b in p.logit_bias.items() if 0 <= t < vocab_size]
        if biased:
            r, c, v = zip(*biased)
            bias_rows, bias_cols, bias_values = to_dev(r, torch.int64), to_dev(c, torch.int64), to_dev(v, torch.float32)

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
            allowed_mask=allowed_mask,
            bias_rows=bias_rows,
            bias_cols=bias_cols,
            bias_values=bias_values,
        )


def banned_by_bad_words(bad_words_token_ids: list[list[int]], output_token_ids: list[int]) -> list[int]:
    """Tokens a request may not sample next: a bad word's last token when the tokens before it end the output
    (vLLM's rule; a one-token word is always banned)."""
    banned = []
    n = len(output_token_ids)
    for seq in bad_words_token_ids:
        k = len(seq) - 1
        if k == 0 or (k <= n and output_token_ids[n - k:] == seq[:-1]):
            banned.append(seq[-1])
    return banned


def _allowed_mask(params: list[SamplingParams], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] bool: rows with allowed_token_ids allow only those ids, other rows allow everything."""
    rows, cols = [], []
    for i, p in enumerate(params):
        for t in p.allowed_token_ids or ():
            if 0 <= t < vocab_size:
                rows.append(i)
                cols.append(t)
    pin = device.type == "cuda"
    small = [torch.tensor(x, dtype=d, pin_memory=pin).to(device, non_blocking=pin)
             for x, d in (([not p.allowed_token_ids for p in params], torch.bool), (rows, torch.int64),
                          (cols, torch.int64))]
    unrestricted, rows_t, cols_t = small
    mask = unrestricted.unsqueeze(1).repeat(1, vocab_size)  # built on the device: only the ids travel
    mask[rows_t, cols_t] = True
    return mask


def _pad(seqs: list[list[int]], pad: int) -> list[list[int]]:
    """Right-pad ragged token lists with `pad` (at least one column so the tensor is never [B, 0]-shaped)."""
    width = max((len(s) for s in seqs), default=0) or 1
    return [list(s) + [pad] * (width - len(s)) for s in seqs]
