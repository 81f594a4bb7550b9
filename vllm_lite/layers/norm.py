"""RMSNorm with HF numerics (statistics in float32, cast back before the weight multiply), optionally fused with
the residual add so that a Triton fused add+RMSNorm kernel can replace it without touching the models."""
from __future__ import annotations

import torch
from torch import nn

# The reference lives with the kernels that reproduce it (kernels/qk_norm_rope.py); it is this layer's eager path.
from vllm_lite.kernels.qk_norm_rope import rms_norm_ref

__all__ = ["RMSNorm", "rms_norm_ref"]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual), the pre-norm block pattern.

        The branch is on an argument's presence (static per call site), never on data, so torch.compile keeps one
        graph per call site.
        """
        if residual is None:
            return rms_norm_ref(x, self.weight, self.eps)
        x = x + residual
        return rms_norm_ref(x, self.weight, self.eps), x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
