"""`method: "draft_model"`: a smaller causal LM with the target's vocabulary drafts k tokens per step.

It is loaded in the worker by the target's loader (same architectures, checkpoint formats and dtype) with its own
attention context; its KV cache shares the target's block ids (see drafter.py for one proposal's forwards).
"""
from __future__ import annotations

import logging

import torch

from vllm_lite.config import LoadConfig, ModelConfig
from vllm_lite.model_loader import load_model, resolve_model
from vllm_lite.spec_decode.drafter import ModelDrafter

logger = logging.getLogger("vllm_lite.spec_decode")


class DraftModelDrafter(ModelDrafter):
    token_shift = 0

    def load(self, target_model: torch.nn.Module) -> None:
        spec = self.config.speculative
        load = self.config.load
        info = resolve_model(ModelConfig(model=spec.model, dtype=self.target_info.dtype_name),
                             LoadConfig(load_format=load.load_format, download_dir=load.download_dir),
                             self.device.type)
        hf = info.hf_config
        if int(hf.vocab_size) != self.vocab_size:
            raise ValueError(f"draft model {spec.model!r} has a vocabulary of {hf.vocab_size} tokens, the target "
                             f"{self.vocab_size}: a draft model must share the target's vocabulary")
        if info.max_model_len < self.max_model_len:
            raise ValueError(f"draft model {spec.model!r} has a context of {info.max_model_len} tokens, shorter "
                             f"than max_model_len={self.max_model_len}; lower max_model_len")
        ctx = self._make_context(hf)
        self.model = load_model(info, self.config.load, self.device, ctx, seed=self.config.model.seed + 1,
                                kernels=self.config.kernels)
        self.draft_info = info
        self._finish_load(hf.hidden_size)
        logger.info("draft model %s: %d layers, hidden %d, k = %d", spec.model, self.num_layers, hf.hidden_size,
                    self.k)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)
