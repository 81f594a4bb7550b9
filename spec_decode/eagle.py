"""`method: "eagle" | "eagle3"`: EAGLE-style draft heads in the public checkpoint layouts, fed by the target's
hidden states.

EAGLE (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B): a Llama config with one decoder layer (`layers.0.*`, whose
input_layernorm is not applied, as in the reference implementation) after `fc` [hidden, 2 * hidden] fusing
[token embedding, target hidden state]; the output (last residual stream, no final norm) goes through the target's
lm_head and is the next draft step's hidden state. `embed_tokens` is the target's when the checkpoint has none.

EAGLE-3 (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): `fc` [hidden, 3 * target_hidden] fuses the target's low, middle
and high layer inputs (config `eagle_config.eagle_aux_hidden_state_layer_ids`, else layers 2, L/2, L-3); `midlayer`
is one decoder layer whose attention reads [input_layernorm(embedding), hidden_norm(hidden)] (2 * hidden -> q/k/v),
then `norm`; `lm_head` [draft_vocab_size, hidden] scores a draft vocabulary mapped to target ids by `d2t` (target id
= draft id + d2t[draft id]; `t2d` is not needed). The pre-norm output is the next draft step's hidden state.

A catch-up row at position p pairs the target's hidden state at p with token p + 1 (`token_shift` 1), so the head's
KV cache holds the same positions as the target's.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from vllm_lite.attention import AttentionContext
from vllm_lite.config import KernelConfig
from vllm_lite.layers.norm import RMSNorm
from vllm_lite.layers.rotary import get_rope
from vllm_lite.model_loader.hf_config import load_hf_config
from vllm_lite.model_loader.weights import checkpoint_weights, init_dummy_weights
from vllm_lite.models.decoder import (DecoderAttention, DecoderForCausalLM, DecoderLayer, DecoderMLP, Linear,
                                      WeightLoadError)
from vllm_lite.spec_decode.drafter import DraftBatch, ModelDrafter
from vllm_lite.spec_decode.padded_proposal import MAX_BATCH, PaddedProposer, RowsBackend

logger = logging.getLogger("vllm_lite.spec_decode")


class _HeadWeights:
    """HF-name weight loading shared with the decoder models (fused q/k/v and gate/up slices, clear errors)."""
    _targets = DecoderForCausalLM._targets
    load_weights = DecoderForCausalLM.load_weights


class Eagle1Head(nn.Module, _HeadWeights):
    def __init__(self, cfg: Any, ctx: AttentionContext, kernels: KernelConfig, has_embed: bool, fc_bias: bool,
                 max_tokens: int) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, hidden) if has_embed else None
        self.fc = Linear(2 * hidden, hidden, bias=fc_bias)
        self.rotary_emb = get_rope(cfg)
        qkv_bias = bool(getattr(cfg, "attention_bias", False))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ctx, qkv_bias, False, kernels.skinny_gemm)
                                    for i in range(cfg.num_hidden_layers))
        self.layers[0].input_layernorm = nn.Identity()  # the reference skips the first layer's input norm
        # The target hidden state of each row (catch-up) or the head's own (decode), written before each forward.
        self.register_buffer("hidden_in", torch.zeros(max_tokens, hidden), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        embeds = self.embed_tokens(input_ids)
        hidden = self.fc(torch.cat([embeds, self.hidden_in[: input_ids.shape[0]]], dim=-1))
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin)
        out = hidden + residual
        return out, [out]


class Eagle3Layer(nn.Module):
    """EAGLE-3's midlayer: attention over [norm(embedding), norm(hidden)], residual from the hidden state."""

    def __init__(self, cfg: Any, ctx: AttentionContext, skinny: bool) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        qkv_bias = bool(getattr(cfg, "attention_bias", False))
        self.self_attn = DecoderAttention(cfg, 0, ctx, qkv_bias, False, skinny)
        attn = self.self_attn
        offsets = attn.qkv_proj.shard_offsets
        attn.qkv_proj = Linear(2 * hidden, attn.q_size + 2 * attn.kv_size, bias=qkv_bias, skinny=skinny)
        attn.qkv_proj.shard_offsets = offsets
        self.mlp = DecoderMLP(cfg, skinny)
        self.input_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.norm_before_residual = bool(getattr(cfg, "norm_before_residual", False))

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = self.self_attn(torch.cat([self.input_layernorm(embeds), normed], dim=-1), cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Eagle3Head(nn.Module, _HeadWeights):
    def __init__(self, cfg: Any, ctx: AttentionContext, kernels: KernelConfig, has_embed: bool, vocab_size: int,
                 target_hidden: int, max_tokens: int) -> None:
        super().__init__()
        hidden = cfg.hidden_size
        if cfg.num_hidden_layers != 1:
            raise ValueError(f"EAGLE-3 heads with {cfg.num_hidden_layers} layers are not supported (one midlayer)")
        self.embed_tokens = nn.Embedding(vocab_size, hidden) if has_embed else None
        self.fc = Linear(3 * target_hidden, hidden, bias=False)
        self.rotary_emb = get_rope(cfg)
        self.midlayer = Eagle3Layer(cfg, ctx, kernels.skinny_gemm)
        self.norm = RMSNorm(hidden, cfg.rms_norm_eps)
        self.draft_vocab_size = int(getattr(cfg, "draft_vocab_size", None) or vocab_size)
        self.lm_head = nn.Linear(hidden, self.draft_vocab_size, bias=False)
        self.register_buffer("hidden_in", torch.zeros(max_tokens, hidden), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        embeds = self.embed_tokens(input_ids)
        hidden = self.hidden_in[: input_ids.shape[0]]
        cos, sin = self.rotary_emb.cos_sin(positions, hidden.dtype)
        x, residual = self.midlayer(embeds, hidden, cos, sin)
        normed, prenorm = self.norm(x, residual)
        return normed, [prenorm]


class EagleDrafter(ModelDrafter):
    token_shift = 1
    needs_hidden = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        spec = self.config.speculative
        self.eagle3 = spec.method == "eagle3"
        self.path = _head_folder(spec.model, self.config.load.download_dir)
        self.head_config = load_hf_config(self.path)
        target_layers = int(self.target_info.hf_config.num_hidden_layers)
        if self.eagle3:
            ids = tuple(int(i) for i in (getattr(self.head_config, "eagle_config", None) or {}).get(
                "eagle_aux_hidden_state_layer_ids", (2, target_layers // 2, target_layers - 3)))
            if len(ids) != 3 or not all(0 <= i < target_layers for i in ids):
                raise ValueError(f"EAGLE-3 reads three target layers; {list(ids)} does not fit a target of "
                                 f"{target_layers} layers (set eagle_config.eagle_aux_hidden_state_layer_ids)")
            self.aux_hidden_layers = tuple(sorted(set(ids)))  # the target returns them in layer order
            self._aux_order = [self.aux_hidden_layers.index(i) for i in ids]
        self.max_tokens = self.stagers[0].max_tokens
        self.padded: PaddedProposer | None = None  # proposals of uniform steps, on the device (padded_proposal.py)

    def load(self, target_model: torch.nn.Module) -> None:
        cfg = self.head_config
        target_hf = self.target_info.hf_config
        dummy = self.config.load.load_format == "dummy"
        weights = {} if dummy else {name.removeprefix("model."): t for name, t in checkpoint_weights(self.path)}
        has_embed = "embed_tokens.weight" in weights
        ctx = self._make_context(cfg)
        kernels = self.config.kernels
        target_hidden = int(getattr(cfg, "target_hidden_size", None) or target_hf.hidden_size)
        if target_hidden != target_hf.hidden_size or (not self.eagle3 and cfg.hidden_size != target_hf.hidden_size):
            raise ValueError(f"EAGLE head {self.config.speculative.model!r} expects target hidden size "
                             f"{target_hidden}, the target has {target_hf.hidden_size}")
        with torch.device(self.device):
            if self.eagle3:
                head = Eagle3Head(cfg, ctx, kernels, has_embed, self.vocab_size, target_hidden, self.max_tokens)
            else:
                head = Eagle1Head(cfg, ctx, kernels, has_embed, "fc.bias" in weights, self.max_tokens)
        head.to(self.dtype)
        d2t = weights.pop("d2t", None)
        if dummy:  # benchmarks: random weights, and a random draft vocabulary
            init_dummy_weights(head, self.config.model.seed + 1)
            gen = torch.Generator().manual_seed(self.config.model.seed)
            ids = torch.sort(torch.randperm(self.vocab_size, generator=gen)[: head.draft_vocab_size]).values
            d2t = ids - torch.arange(head.draft_vocab_size)
        if self.eagle3 and head.draft_vocab_size != self.vocab_size:
            if d2t is None:
                raise WeightLoadError(f"EAGLE-3 head with draft_vocab_size {head.draft_vocab_size} < vocab "
                                      f"{self.vocab_size} needs the d2t tensor")
            self.draft_to_target = (torch.arange(head.draft_vocab_size) + d2t.long()).to(self.device)
        else:
            self.draft_to_target = None
        if not dummy:
            head.load_weights(weights.items())
        if not has_embed:  # shared with the target
            head.embed_tokens = target_model.model.embed_tokens
        head.eval()
        self.model = head
        self.target = target_model
        self._finish_load(cfg.hidden_size)
        logger.info("%s head %s (%d layer, hidden %d%s), k = %d", "EAGLE-3" if self.eagle3 else "EAGLE",
                    self.path, self.num_layers, cfg.hidden_size,
                    f", draft vocab {head.draft_vocab_size}" if self.eagle3 else "", self.k)

    def _make_context(self, hf_config: Any) -> Any:
        ctx = super()._make_context(hf_config)
        ctx.backend = RowsBackend(ctx.backend)  # device-built forwards of the padded proposals
        return ctx

    def initialize_kv_cache(self, num_blocks: int) -> None:
        super().initialize_kv_cache(num_blocks)
        if self.config.speculative.disable_padded_drafter_batch:
            return
        padded = PaddedProposer(self, min(MAX_BATCH, self.max_num_seqs))
        if self.use_cuda_graphs:
            try:
                padded.capture()
            except (RuntimeError, ValueError) as e:  # an optimisation: the host path still proposes every step
                logger.warning("EAGLE proposal graphs not captured (%s: %s); proposals take the host path",
                               type(e).__name__, e)
                return
        self.padded = padded

    def hidden_source_widths(self) -> list[int]:
        """Widths of the target hidden states a catch-up row reads (EAGLE-3: the three aux layers, in layer order)."""
        width = int(self.target_info.hf_config.hidden_size)
        return [width] * (len(self.aux_hidden_layers) if self.eagle3 else 1)

    def set_rows_hidden(self, sources: list[torch.Tensor]) -> None:
        """The padded catch-up's hidden inputs: every row of the step (sources as `hidden_source_widths` says)."""
        total = sources[0].shape[0]
        if self.eagle3:
            self.model.hidden_in[:total] = self.model.fc(torch.cat([sources[i] for i in self._aux_order], dim=-1))
        else:
            self.model.hidden_in[:total] = sources[0]

    def _set_catch_up_hidden(self, batch: DraftBatch, lens: np.ndarray) -> None:
        """Row i of the catch-up reads the target hidden state of its position: each request's first lens[r] rows
        of the step."""
        total = int(lens.sum())
        if np.array_equal(lens, batch.query_lens):
            index = None  # every row of the step (prefill, or all drafts accepted)
        else:
            first = np.cumsum(batch.query_lens) - batch.query_lens
            index = np.repeat(first, lens) + np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
            index = torch.from_numpy(index)
            index = (index.pin_memory() if self.device.type == "cuda" else index).to(self.device, non_blocking=True)
        if self.eagle3:
            aux = [batch.aux_hidden[i] for i in self._aux_order]
            src = torch.cat(aux if index is None else [a[index] for a in aux], dim=-1)
            self.model.hidden_in[:total] = self.model.fc(src)
        else:
            self.model.hidden_in[:total] = batch.hidden[:total] if index is None else batch.hidden[index]

    def _set_decode_hidden(self, hidden: torch.Tensor | None) -> None:
        self.model.hidden_in[: hidden.shape[0]].copy_(hidden)

    def _argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.eagle3 and self.draft_to_target is not None:  # argmax over the draft vocabulary, then its target id
            return self.draft_to_target[self.model.lm_head(hidden).argmax(dim=-1)]
        return super()._argmax(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.eagle3:
            return self.target.compute_logits(hidden)
        logits = self.model.lm_head(hidden)
        if self.draft_to_target is None:
            return logits
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        full[:, self.draft_to_target] = logits
        return full


def _head_folder(name: str, download_dir: str | None) -> str:
    """A local folder, or a Hugging Face repo id fetched (config and safetensors)."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, cache_dir=download_dir, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as e:  # no hub package, no network, unknown repo: one clear message
        raise ValueError(f"EAGLE head {name!r} is not a local folder and could not be fetched from the Hugging Face "
                         f"Hub ({type(e).__name__}: {e})") from e
