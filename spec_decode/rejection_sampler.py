"""Verifying speculative tokens so that the output distribution is exactly the target model's.

Request i verifies k_i draft tokens with 1 + k_i rows of target logits (row j: the distribution of the token after
draft j - 1). This module does the logits processing in torch (grammar mask, allowed ids, bans, logit_bias,
penalties, temperature, min-p, top-k/top-p) and the random draws (per-request generators for seeded requests);
kernels/rejection_sampler.py then accepts or rejects: greedy requests keep drafts while they equal the target's
argmax, random ones accept draft d_j with probability min(1, p_j(d_j) / q_j(d_j)) (q_j a point mass on the draft
for n-gram / suffix drafts, the drafter's distribution when given) and resample the first rejected position from
max(p_j - q_j, 0) normalised; after k_i acceptances a bonus token comes from the last row. Per step the output is
1..k_i+1 tokens (a Triton kernel on CUDA, its torch reference elsewhere).

Rows carry the request's sampling parameters; `expand_metadata` repeats a per-request SamplingMetadata over its
rows, and each row's penalty counts include the drafts before it.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_lite.kernels.alignment import packed_starts
from vllm_lite.kernels.argmax import row_argmax
from vllm_lite.kernels.rejection_sampler import verify_drafts
from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sample.sampler import Sampler
from vllm_lite.sample.topk_topp import apply_min_p, apply_top_k_top_p


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small int64 host list on the device without a stream sync (a copy from pageable memory would wait for the
    forward just launched; a pinned one is queued behind it)."""
    t = torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def expand_metadata(meta: SamplingMetadata, counts_list: list[int], offsets: list[int]) -> SamplingMetadata:
    """Per-request metadata [S] -> per-row metadata [R] (request i owns rows offsets[i] .. + counts_list[i])."""
    device = meta.temperature.device
    rep = to_device(counts_list, device)
    total = sum(counts_list)

    def expand(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat_interleave(rep, dim=0, output_size=total)

    starts_t = to_device(offsets, device)

    def expand_sparse(rows: torch.Tensor | None, *values: torch.Tensor) -> tuple:
        """(row, column, value...) entries of a request repeated on each of its rows."""
        if rows is None:
            return (None,) * (1 + len(values))
        n = rep[rows]
        return (torch.repeat_interleave(starts_t[rows], n) + _ranks(n),
                *(torch.repeat_interleave(v, n) for v in values))

    blocked_rows, blocked_cols = expand_sparse(meta.blocked_rows, meta.blocked_cols)
    bias_rows, bias_cols, bias_values = expand_sparse(meta.bias_rows, meta.bias_cols, meta.bias_values)
    generators = {offsets[i] + j: g for i, g in meta.generators.items() for j in range(counts_list[i])}
    return dataclasses.replace(
        meta, temperature=expand(meta.temperature), is_greedy=expand(meta.is_greedy), top_k=expand(meta.top_k),
        top_p=expand(meta.top_p), min_p=expand(meta.min_p), prompt_token_ids=expand(meta.prompt_token_ids),
        output_token_ids=expand(meta.output_token_ids), repetition_penalty=expand(meta.repetition_penalty),
        presence_penalty=expand(meta.presence_penalty), frequency_penalty=expand(meta.frequency_penalty),
        blocked_rows=blocked_rows, blocked_cols=blocked_cols, generators=generators,
        logits_mask=expand(meta.logits_mask), allowed_mask=expand(meta.allowed_mask), bias_rows=bias_rows,
        bias_cols=bias_cols, bias_values=bias_values)


def _ranks(n: torch.Tensor) -> torch.Tensor:
    """0..n[i]-1 for each i, concatenated."""
    total = int(n.sum())
    starts = torch.cumsum(n, 0) - n
    return torch.arange(total, device=n.device) - torch.repeat_interleave(starts, n, output_size=total)


def target_probs(logits: torch.Tensor, meta: SamplingMetadata, use_kernel: bool = False) -> torch.Tensor:
    """The distribution each random row samples from (temperature, min-p, top-k/top-p), [R, V] float32.
    use_kernel: the Triton filter kernel on CUDA (KernelConfig.sampling_kernel)."""
    logits = logits / meta.temperature.unsqueeze(1)
    if not meta.no_min_p:
        logits = apply_min_p(logits, meta.min_p, use_kernel=use_kernel)
    if not (meta.no_top_k and meta.no_top_p):
        logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p, max_k=meta.max_top_k, use_kernel=use_kernel)
    return logits.softmax(dim=-1)


def rejection_sample(logits: torch.Tensor, meta: SamplingMetadata, draft_ids: torch.Tensor,
                     num_drafts: list[int], row_mask: torch.Tensor | None = None,
                     use_sampling_kernel: bool = False, draft_probs: torch.Tensor | None = None,
                     use_kernel: bool | None = None,
                     want_row_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [R, V] (R = sum(1 + k_i)), per-request `meta`, drafts [S, K] (-1 padded), k_i = num_drafts[i],
    row_mask [R, V] bool: the grammar's allowed tokens per row (None: all); draft_probs [S, K, V] float32: the
    drafter's distributions (None: point masses on the drafts, as n-gram / suffix / greedy drafters give).
    use_kernel: kernels/rejection_sampler.py's Triton verification (None: on CUDA when triton is there).

    Logits processing is torch: grammar mask, allowed ids, bans, logit_bias, penalties (each row also counts the
    drafts before it as output tokens, so penalised requests verify exactly), then temperature and filters.
    Returns (tokens [S, K + 1] int64, -1 after each request's last output token; row_tokens [R]: the output
    token each logits row produced, for logprobs; rows past a request's outputs hold garbage; None when
    `want_row_tokens` is False: batch-1 speculation runs this every step, and each device op is host time there)."""
    device = logits.device
    s, kmax = draft_ids.shape
    counts_list = [k + 1 for k in num_drafts]
    offsets = [0]
    for c in counts_list[:-1]:
        offsets.append(offsets[-1] + c)
    # One copy for the three per-request vectors (each copy is a launch of its own), each 16-byte aligned as the
    # verify kernel's warm-up compiled it (kernels/alignment.py).
    a, b, c, total = packed_starts((s, s, s), 8)
    values = [0] * total
    values[a: a + s], values[b: b + s], values[c: c + s] = counts_list, offsets, num_drafts
    packed = to_device(values, device)
    counts, offsets_t, num_drafts_t = packed[a: a + s], packed[b: b + s], packed[c: c + s]
    total = logits.shape[0]
    fast = meta.all_greedy and row_mask is None and meta.no_token_constraints and meta.no_penalties
    req_of_row = pos_of_row = None
    if not fast or want_row_tokens:
        # Row r belongs to request req_of_row[r], at position pos_of_row[r] among its rows (no device sync: the row
        # count is known here).
        req_of_row = torch.repeat_interleave(torch.arange(s, device=device), counts, output_size=total)
        pos_of_row = torch.arange(total, device=device) - offsets_t[req_of_row]
    if fast:
        # Nothing changes a greedy row's argmax (the common case): no per-row metadata, no float32 copy.
        greedy_tokens = row_argmax(logits)
    else:
        rows_meta = expand_metadata(meta, counts_list, offsets)
        if row_mask is not None:
            rows_meta = dataclasses.replace(rows_meta, logits_mask=row_mask)
        if rows_meta.output_token_ids is not None:
            rows_meta = dataclasses.replace(rows_meta, output_token_ids=_with_draft_prefixes(
                rows_meta.output_token_ids, draft_ids, req_of_row, pos_of_row, meta.vocab_size or logits.shape[1]))
        logits = Sampler.apply_constraints(logits.to(torch.float32, copy=True), rows_meta)
        greedy_tokens = row_argmax(logits)
    if meta.all_greedy:
        tokens = verify_drafts(draft_ids, num_drafts_t, offsets_t, greedy_tokens, None, None, None, None, None,
                               use_kernel)
    else:
        probs = target_probs(logits, rows_meta, use_sampling_kernel)
        uniforms, noise = _random_draws(s, kmax, probs.shape, counts_list, offsets, meta.generators, device)
        tokens = verify_drafts(draft_ids, num_drafts_t, offsets_t, greedy_tokens, meta.is_greedy, probs,
                               draft_probs, uniforms, noise, use_kernel)
    if not want_row_tokens:
        return tokens, None
    return tokens, tokens[req_of_row, pos_of_row].clamp(min=0)


def _with_draft_prefixes(output_ids: torch.Tensor, draft_ids: torch.Tensor, req_of_row: torch.Tensor,
                         pos_of_row: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-row output ids [R, Lo] -> [R, Lo + K]: row j of request i also holds drafts 0..j-1 of request i (the
    tokens that precede that row), padded with `pad` (penalties drop it)."""
    cols = torch.arange(draft_ids.shape[1], device=output_ids.device)
    prefix = torch.where(cols[None, :] < pos_of_row[:, None], draft_ids[req_of_row], pad)
    return torch.cat([output_ids, prefix], dim=1)


def _random_draws(s: int, kmax: int, shape: torch.Size, counts_list: list[int], offsets: list[int],
                  generators: dict[int, torch.Generator], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Acceptance uniforms [S, K] and Exp(1) noise [R, V]; a seeded request draws its K uniforms and its rows'
    noise from its own generator (the same stream whatever else is in the batch)."""
    uniforms = torch.rand(s, kmax, device=device)
    noise = torch.empty(shape, device=device).exponential_()
    for i, g in generators.items():
        uniforms[i] = torch.rand(kmax, device=device, generator=g)
        noise[offsets[i]:offsets[i] + counts_list[i]].exponential_(generator=g)
    return uniforms, noise
