"""Llama-family decoder-only models (Llama, Qwen2, Qwen3) as plain nn.Modules over flat token batches.

One class covers the family; the subclasses only switch features (qkv bias, per-head q/k RMSNorm). Projections are
fused (qkv_proj, gate_up_proj) so that a step runs two big GEMMs instead of five. Tensor parallelism lives in the
layers (vllm_lite/layers/linear.py, vocab_parallel.py): given a TPGroup, each holds its rank's shard and carries the
loader that cuts it from the HF tensor; `load_weights` only maps HF names to parameters and calls those loaders.
Attention metadata and KV caches come from the AttentionContext given at construction, so forward has no data-dependent Python control flow and torch.compile can trace it with a dynamic token dimension.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vllm_lite.attention import Attention, AttentionContext
from vllm_lite.config import KernelConfig
from vllm_lite.distributed import TPGroup
from vllm_lite.layers.activation import SiluAndMul
from vllm_lite.layers.linear import (Linear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                     WeightLoadError, fused_rows_loader, kv_heads_of_rank, weight_loader_of)
from vllm_lite.layers.norm import RMSNorm
from vllm_lite.layers.rotary import get_rope, head_dim_of
from vllm_lite.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding

logger = logging.getLogger("vllm_lite.models")

# Linear and WeightLoadError live in vllm_lite.layers.linear; models and the EAGLE heads import them from here.
__all__ = ["DecoderForCausalLM", "LlamaForCausalLM", "Linear", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
           "WeightLoadError", "check_tensor_parallel"]

# (fused parameter module, HF module, shard id) for the HF tensors that land in a slice of a fused parameter.
FUSED_SHARDS = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
                ("gate_up_proj", "gate_proj", "gate"), ("gate_up_proj", "up_proj", "up"))


class DecoderAttention(nn.Module):
    """This rank's query heads and the KV heads they read (all of them with one rank)."""

    def __init__(self, cfg: Any, layer_idx: int, ctx: AttentionContext, qkv_bias: bool, qk_norm: bool,
                 skinny: bool = False, tp: TPGroup | None = None) -> None:
        super().__init__()
        num_heads = cfg.num_attention_heads
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        self.head_dim = head_dim_of(cfg)
        o_bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=qkv_bias,
                                          skinny=skinny, tp=tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, cfg.hidden_size, bias=o_bias, skinny=skinny,
                                        tp=tp)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, ctx)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Per-head q/k RMSNorm (Qwen3), rotary, the KV-cache write and attention all happen inside the attention
        # op (on CUDA the first three in one kernel); q, k, v stay views of the projection.
        norm = self.q_norm is not None
        out = self.attn(q, k, v, cos, sin, self.q_norm.weight if norm else None,
                        self.k_norm.weight if norm else None, self.q_norm.eps if norm else 0.0)
        return self.o_proj(out)


class DecoderMLP(nn.Module):
    def __init__(self, cfg: Any, skinny: bool = False, tp: TPGroup | None = None) -> None:
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [("gate", inter), ("up", inter)], bias=bias,
                                                       skinny=skinny, tp=tp)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias=bias, skinny=skinny, tp=tp)
        self.act = SiluAndMul()
        act = getattr(cfg, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported (only silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, ctx: AttentionContext, qkv_bias: bool, qk_norm: bool,
                 skinny: bool = False, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(cfg, layer_idx, ctx, qkv_bias, qk_norm, skinny, tp)
        self.mlp = DecoderMLP(cfg, skinny, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer (static: known at trace time)
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: Any, ctx: AttentionContext, qkv_bias: bool, qk_norm: bool, skinny: bool = False,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary_emb = get_rope(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ctx, qkv_bias, qk_norm, skinny, tp)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Layers whose input hidden state the forward also returns (EAGLE-style draft heads read them); static for
        # torch.compile: set before the first compiled call.
        self.aux_hidden_state_layers: tuple[int, ...] = ()

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        residual = None
        aux: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if i in self.aux_hidden_state_layers:  # the residual stream entering layer i
                aux.append(hidden if residual is None else hidden + residual)
            hidden, residual = layer(hidden, residual, cos, sin)
        hidden, _ = self.norm(hidden, residual)
        return (hidden, aux) if self.aux_hidden_state_layers else hidden


class DecoderForCausalLM(nn.Module):
    """Base of the Llama-family causal LMs: `forward(input_ids[T], positions[T]) -> hidden [T, hidden]`.

    `kernels` (default KernelConfig.from_env()): its skinny_gemm decides, here at construction, whether the
    projections use the skinny-GEMM op on CUDA. `tp`: this rank's tensor-parallel group (None: one rank); every
    rank's forward returns the whole hidden states and compute_logits the whole logits."""
    qkv_bias_default = False
    qk_norm = False

    def __init__(self, hf_config: Any, attn_ctx: AttentionContext, kernels: KernelConfig | None = None,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = hf_config
        qkv_bias = self.qkv_bias_default or bool(getattr(hf_config, "attention_bias", False))
        if getattr(hf_config, "use_sliding_window", False):
            logger.warning("sliding-window attention is not implemented; attending to the full context")
        kernels = kernels if kernels is not None else KernelConfig.from_env()
        self.model = DecoderModel(hf_config, attn_ctx, qkv_bias, self.qk_norm, kernels.skinny_gemm, tp)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(hf_config.hidden_size, hf_config.vocab_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Flat batch of tokens (any mix of requests) -> final-normed hidden states [T, hidden]; with
        aux hidden-state layers set, (hidden, [the residual stream entering each of those layers, [T, hidden]])."""
        return self.model(input_ids, positions)

    def set_aux_hidden_state_layers(self, layers: tuple[int, ...]) -> None:
        """Also return the hidden states entering these layers (EAGLE-3 reads a low, middle and high one)."""
        bad = [i for i in layers if not 0 <= i < len(self.model.layers)]
        if bad:
            raise ValueError(f"aux hidden-state layers {bad} out of range (the model has {len(self.model.layers)})")
        self.model.aux_hidden_state_layers = tuple(layers)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (usually only the rows that sample) -> logits [N, vocab] in the model's dtype: the
        sampler reads them as they are (greedy, inverse-CDF sampling) or makes its own float32 copy."""
        return self.lm_head(hidden_states)

    # ---- weight loading -------------------------------------------------------------------------------------
    def _targets(self) -> dict[str, tuple[torch.nn.Parameter, str | None]]:
        """HF tensor name -> (parameter, shard id of a fused parameter or None) covering every tensor the
        checkpoint must provide."""
        modules = dict(self.named_modules())
        targets: dict[str, tuple[torch.nn.Parameter, str | None]] = {}
        for name, param in self.named_parameters():
            mod_name, _, leaf = name.rpartition(".")
            fused = [(hf, shard) for f, hf, shard in FUSED_SHARDS if mod_name.endswith("." + f)]
            if fused:
                module = modules[mod_name]
                if not hasattr(param, "weight_loader"):  # a plain Linear with shard_offsets (the EAGLE heads)
                    param.weight_loader = fused_rows_loader(module.shard_offsets)
                prefix = mod_name[: -len(mod_name.rpartition(".")[2])]
                for hf, shard in fused:
                    targets[f"{prefix}{hf}.{leaf}"] = (param, shard)
            else:
                targets[name] = (param, None)
        return targets

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hand each HF-named tensor to its parameter's loader (which cuts this rank's shard and checks the whole
        shape); missing tensors and wrong shapes raise WeightLoadError naming the tensor; tensors the model does
        not use (rotary inv_freq, a tied lm_head) are skipped."""
        targets = self._targets()
        loaded: set[str] = set()
        skipped = 0
        for name, tensor in weights:
            target = targets.get(name)
            if target is None:
                skipped += 1
                logger.debug("ignoring checkpoint tensor %s %s", name, tuple(tensor.shape))
                continue
            param, shard = target
            try:
                weight_loader_of(param)(param, tensor, shard)
            except WeightLoadError as e:
                raise WeightLoadError(f"shape mismatch for tensor {name}: {e}") from None
            loaded.add(name)
        missing = sorted(set(targets) - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise WeightLoadError(f"checkpoint is missing {len(missing)} tensor(s) the model needs: {shown}")
        if skipped:
            logger.debug("ignored %d checkpoint tensor(s) the model does not use", skipped)


def check_tensor_parallel(hf_config: Any, tp_size: int) -> None:
    """ValueError naming what does not split over tp_size ranks (query heads, KV heads, MLP width), before any
    process or weight is touched; the vocabulary always splits (it is padded)."""
    if tp_size == 1:
        return
    tp = TPGroup(0, tp_size)
    heads = hf_config.num_attention_heads
    tp.divide(heads, "num_attention_heads")
    kv_heads_of_rank(getattr(hf_config, "num_key_value_heads", None) or heads, tp)
    tp.divide(hf_config.intermediate_size, "intermediate_size")


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama (1/2/3, SmolLM2, Mistral-style dense): biases only when the config's attention_bias says so."""


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2 / Qwen2.5: bias on q/k/v (not on o_proj)."""
    qkv_bias_default = True


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3 dense: per-head RMSNorm on q and k before rotary, explicit head_dim."""
    qk_norm = True
