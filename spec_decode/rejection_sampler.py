"""Verifying speculative tokens so that the output distribution is exactly the target model's (torch reference).

Request i verifies k_i draft tokens with 1 + k_i rows of target logits (row j: the distribution of the token after
draft j - 1). Greedy requests accept drafts while they equal the target's argmax, then take the argmax at the first
mismatch (or the bonus row when all matched): exactly the tokens plain greedy decoding would produce. Random
requests use the rejection rule for a draft proposed without probabilities (a point mass, as n-gram and suffix
proposers do): accept draft d_j with probability p_j(d_j); at the first rejection sample from p_j with d_j removed
(renormalised); after k accepted drafts sample the bonus token from p_k. Per step the output is 1..k+1 tokens.

Rows carry the request's sampling parameters (temperature, filters, penalties, grammar mask, allowed ids, blocked
tokens, logit_bias); `expand_metadata` repeats a per-request SamplingMetadata over its rows.
"""
from __future__ import annotations

import dataclasses

import torch

from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sample.sampler import Sampler
from vllm_lite.sample.topk_topp import apply_min_p, apply_top_k_top_p, random_sample


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
                     use_sampling_kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] (R = sum(1 + k_i)), per-request `meta`, drafts [S, K] (-1 padded), k_i = num_drafts[i],
    row_mask [R, V] bool: the grammar's allowed tokens per row (None: all).

    Returns (tokens [S, K + 1] int64, -1 after each request's last output token; row_tokens [R]: the output
    token each logits row produced, for logprobs; rows past a request's outputs hold garbage)."""
    device = logits.device
    s, kmax = draft_ids.shape
    counts_list = [k + 1 for k in num_drafts]
    offsets = [0]
    for c in counts_list[:-1]:
        offsets.append(offsets[-1] + c)
    counts = to_device(counts_list, device)
    rows_meta = expand_metadata(meta, counts_list, offsets)
    if row_mask is not None:
        rows_meta = dataclasses.replace(rows_meta, logits_mask=row_mask)
    logits = Sampler.apply_constraints(logits.to(torch.float32, copy=True), rows_meta)
    # Row index of (request, position), clamped inside the request's own rows.
    pos = torch.arange(kmax + 1, device=device)
    row_idx = to_device(offsets, device)[:, None] + torch.minimum(pos[None, :], (counts - 1)[:, None])
    has_draft = pos[None, :kmax] < (counts - 1)[:, None]  # [S, K]
    drafts = torch.where(has_draft, draft_ids, 0)

    greedy_tokens = logits.argmax(dim=-1)
    accept = drafts == greedy_tokens[row_idx[:, :kmax]]
    final = greedy_tokens
    if not meta.all_greedy:
        probs = target_probs(logits, rows_meta, use_sampling_kernel)
        p_draft = probs[row_idx[:, :kmax], drafts]  # [S, K]
        u = torch.rand(p_draft.shape, device=device)
        for i in {r for r in range(s) if offsets[r] in rows_meta.generators}:
            u[i] = torch.rand(kmax, device=device, generator=rows_meta.generators[offsets[i]])
        random_accept = u < p_draft
        is_greedy = meta.is_greedy[:, None]
        accept = torch.where(is_greedy, accept, random_accept)
        # Residual distributions: each draft row without its draft token (rows after the drafts keep p).
        residual = probs.clone()
        flat_rows = row_idx[:, :kmax][has_draft]
        residual[flat_rows, drafts[has_draft]] = 0.0
        empty = residual.sum(dim=-1, keepdim=True) <= 0  # p was a point mass on the draft: it would be accepted
        residual = torch.where(empty, probs, residual)
        sampled = random_sample(residual, rows_meta.generators)
        final = torch.where(meta.is_greedy.repeat_interleave(counts, output_size=logits.shape[0]),
                            greedy_tokens, sampled)
    accept = accept & has_draft
    num_accepted = torch.cumprod(accept.to(torch.int64), dim=1).sum(dim=1)  # leading accepted drafts [S]
    final_at = final[row_idx.gather(1, num_accepted[:, None])[:, 0]]  # [S]
    tokens = torch.full((s, kmax + 1), -1, dtype=torch.int64, device=device)
    tokens[:, :kmax] = torch.where(pos[None, :kmax] < num_accepted[:, None], drafts, -1)
    tokens.scatter_(1, num_accepted[:, None], final_at[:, None])
    row_tokens = torch.zeros(logits.shape[0], dtype=torch.int64, device=device)
    valid = pos[None, :] < counts[:, None]
    row_tokens[row_idx[valid]] = tokens[valid].clamp(min=0)
    return tokens, row_tokens
