"""Row argmax, the greedy sampler's core: torch's on the device, numpy's for float32 host tensors.

On the CPU torch's argmax over [256, 49,152] float32 logits took 29.9 ms (one thread), numpy's 4.5 ms: with greedy
decoding at batch 256 that was a third of a CPU step. Both return the first maximum of each row (and the first NaN,
if any), so the two paths pick the same tokens.
"""
from __future__ import annotations

import numpy as np
import torch


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension of a 2-D tensor, int64, on x's device."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0:
        return torch.from_numpy(np.argmax(x.detach().numpy(), axis=-1).astype(np.int64, copy=False))
    return x.argmax(dim=-1)
