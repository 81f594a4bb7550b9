"""The batched sampler: logits [B, V] + SamplingMetadata -> sampled ids (and logprobs when asked).

Order (matches vLLM V1): logits mask -> allowed_token_ids -> min_tokens / bad-words blocking -> logit_bias ->
penalties -> greedy argmax -> temperature -> min-p -> top-k/top-p -> random sample. Logprobs are vLLM's default
"raw" logprobs: log_softmax of the model's logits before any of the above, so they describe the model, not the
sampling transform.
Everything is tensor work on the logits' device; stages a batch does not need are skipped by host-side flags.
With only a temperature (no filters, penalties, masks or seeds) CUDA batches sample by inverse CDF in one read of
the logits (kernels/cdf_sample.py): the same distribution, one random number per row instead of one per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_lite.config import KernelConfig
from vllm_lite.kernels.argmax import row_argmax
from vllm_lite.kernels.cdf_sample import HAS_TRITON, cdf_sample_triton
from vllm_lite.kernels.sampling import apply_min_p, apply_top_k_top_p
from vllm_lite.sample.metadata import SamplingMetadata
from vllm_lite.sample.penalties import apply_blocked_tokens, apply_penalties
from vllm_lite.sample.topk_topp import random_sample


@dataclass
class SamplerOutput:
    """Sampled ids [B] int64; logprob fields are None unless some row asked for logprobs.

    logprob_token_ids / logprobs: [B, N+1], column 0 = the sampled token, then the top-N by raw logprob
    (N = meta.max_num_logprobs; rows that asked for fewer just ignore the extra columns).
    ranks: [B] int64, 1 + number of tokens with a strictly greater logprob than the sampled one.
    """

    sampled_token_ids: torch.Tensor
    logprob_token_ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    ranks: torch.Tensor | None = None


class Sampler:
    """One instance per model runner; no per-step state. Does not modify the caller's logits unless they are handed
    over. `kernels.sampling_kernel` (KernelConfig; default: KernelConfig.from_env()) sends min-p / top-k / top-p on
    CUDA through the Triton threshold search (kernels/sampling.py) instead of the torch references."""

    def __init__(self, kernels: KernelConfig | None = None) -> None:
        self.use_sampling_kernel = (kernels if kernels is not None else KernelConfig.from_env()).sampling_kernel

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata, logits_owned: bool = False) -> SamplerOutput:
        """logits_owned: the caller no longer needs `logits`, so float32 logits may be modified in place."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)

        if meta.all_greedy and meta.no_token_constraints and meta.no_penalties:
            # Plain greedy (the common decode case): argmax of the raw logits, no float32 copy of the vocabulary.
            sampled = row_argmax(logits).view(-1)
        elif _one_pass_random(logits, meta):
            # Temperature only (T1's case): one read of the raw logits, no float32 copy or softmax.
            sampled = cdf_sample_triton(logits, meta.temperature, meta.is_greedy)
        else:
            # Own float32 copy (unless handed over): every later stage may work in place.
            logits = logits.to(torch.float32, copy=not (logits_owned and logits.dtype == torch.float32))
            sampled = self.sample(self.apply_constraints(logits, meta), meta)

        if raw_logprobs is None:
            return SamplerOutput(sampled_token_ids=sampled)
        ids, lps, ranks = gather_logprobs(raw_logprobs, meta.max_num_logprobs, sampled)
        return SamplerOutput(sampled_token_ids=sampled, logprob_token_ids=ids, logprobs=lps, ranks=ranks)

    @staticmethod
    def apply_constraints(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Grammar mask, allowed_token_ids, blocked tokens (min_tokens, bad words), logit_bias and penalties: what
        changes the distribution for greedy rows too (vLLM's order)."""
        if meta.logits_mask is not None:
            logits.masked_fill_(~meta.logits_mask, float("-inf"))
        if meta.allowed_mask is not None:
            logits.masked_fill_(~meta.allowed_mask, float("-inf"))
        if meta.blocked_rows is not None:
            apply_blocked_tokens(logits, meta.blocked_rows, meta.blocked_cols)
        if meta.bias_rows is not None:
            logits.index_put_((meta.bias_rows, meta.bias_cols), meta.bias_values, accumulate=True)
        if not meta.no_penalties:
            logits = apply_penalties(logits, meta.prompt_token_ids, meta.output_token_ids,
                                     meta.repetition_penalty, meta.presence_penalty, meta.frequency_penalty)
        return logits

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Greedy rows: argmax of constrained logits. Random rows: temperature, filters, exponential race."""
        greedy = None
        if not meta.all_random:
            greedy = row_argmax(logits).view(-1)
            if meta.all_greedy:
                return greedy

        logits.div_(meta.temperature.unsqueeze(1))
        if not meta.no_min_p:
            logits = apply_min_p(logits, meta.min_p, use_kernel=self.use_sampling_kernel)
        if not (meta.no_top_k and meta.no_top_p):
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p, max_k=meta.max_top_k,
                                       use_kernel=self.use_sampling_kernel)
        probs = logits.softmax(dim=-1)
        sampled = random_sample(probs, meta.generators)
        if greedy is None:
            return sampled
        return torch.where(meta.is_greedy, greedy, sampled)


def _one_pass_random(logits: torch.Tensor, meta: SamplingMetadata) -> bool:
    """Random rows with nothing but a temperature, on CUDA, none seeded: the kernel's case (same distribution as the
    exponential race below; seeded rows keep the torch path, which draws from their own generator)."""
    return (logits.is_cuda and HAS_TRITON and not meta.generators and meta.no_token_constraints and meta.no_penalties
            and meta.no_min_p and meta.no_top_k and meta.no_top_p)


def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int,
                    sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled token's logprob + top-N (ids, values) as [B, N+1] each, and the sampled token's rank [B]."""
    sampled = sampled.view(-1, 1).long()
    sampled_lp = logprobs.gather(1, sampled)
    # Rank like vLLM: ties with the sampled token do not push it down.
    ranks = (logprobs > sampled_lp).sum(dim=-1) + 1
    if num_logprobs > 0:
        top_lp, top_ids = logprobs.topk(num_logprobs, dim=-1)
        ids = torch.cat([sampled, top_ids], dim=1)
        lps = torch.cat([sampled_lp, top_lp], dim=1)
    else:
        ids, lps = sampled, sampled_lp
    return ids, lps, ranks
