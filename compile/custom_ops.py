"""Attention as one opaque torch.library custom op, so Dynamo/inductor never trace into a backend.

`torch.ops.vllm_lite.attention(q, k, v, cos, sin, q_weight, k_weight, eps, ctx_id, layer_idx) -> out` looks up the
AttentionContext registered under `ctx_id` and calls `ctx.backend.forward_rope(...)`: per-head q/k RMSNorm, rotary,
the KV-cache write and attention, fused as far as the backend can (FlashInfer: one Triton kernel for the first
three). The KV-cache write is inside the op: the compiled graph sees a pure function of (q, k, v)
and the per-step state (backend metadata, KV caches) is read when the op runs, never baked into the graph. Under
CUDA-graph capture the op runs once in Python and records the backend's kernels; replays re-run those kernels on
whatever the backend's static buffers hold.

Contexts are held weakly (the model's layers keep them alive), so dropping a model frees its KV caches.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

import torch

_lock = threading.Lock()
_contexts: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_ids: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_specs: "weakref.WeakKeyDictionary[Any, dict[int, Any]]" = weakref.WeakKeyDictionary()
_next_id = itertools.count()


def register_context(ctx: Any) -> int:
    """Register an AttentionContext (idempotent) and return its integer id for the custom op."""
    with _lock:
        cid = _ids.get(ctx)
        if cid is None:
            cid = next(_next_id)
            _ids[ctx] = cid
            _contexts[cid] = ctx
        return cid


def get_context(ctx_id: int) -> Any:
    ctx = _contexts.get(ctx_id)
    if ctx is None:
        raise RuntimeError(f"attention context {ctx_id} is not registered (was its model deleted?)")
    return ctx


def register_layer(ctx: Any, layer_idx: int, spec: Any) -> int:
    """Register a layer's AttentionSpec under its context (registering the context too); returns the ctx id."""
    cid = register_context(ctx)
    with _lock:
        _specs.setdefault(ctx, {})[layer_idx] = spec
    return cid


def _spec_of(ctx: Any, layer_idx: int) -> Any:
    try:
        return _specs[ctx][layer_idx]
    except KeyError:
        raise RuntimeError(f"attention layer {layer_idx} was not registered with register_layer()") from None


# Registered through torch.library.Library rather than the @custom_op decorator: the decorator's wrapper checks
# aliasing and dispatches through extra Python on every call, which measured ~0.5 ms per layer call on the H100
# machine's host in prefill steps (eager, not graph-replayed): 14 ms of host time per 28-layer step, more than
# the GPU needs for an 8192-token chunk. The contract is the same: a functional op whose output aliases no input.
_lib = torch.library.Library("vllm_lite", "FRAGMENT")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? q_weight, Tensor? k_weight, "
            "float eps, int ctx_id, int layer_idx) -> Tensor")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, ctx_id: int,
              layer_idx: int) -> torch.Tensor:
    """q: [T, Hq*D], k/v: [T, Hkv*D] straight from the qkv projection -> [T, Hq*D] (contiguous).

    Inside: per-head q/k RMSNorm (when the weights are given), rotary (cos/sin: [T, rot/2]), the write of k/v into
    the layer's paged KV cache, and attention: `backend.forward_rope`."""
    ctx = get_context(ctx_id)
    out = ctx.backend.forward_rope(q, k, v, cos, sin, q_weight, k_weight, eps, ctx.kv_caches[layer_idx],
                                   _spec_of(ctx, layer_idx), ctx.metadata)
    # The output may not alias an input, and its strides must match the fake impl (contiguous).
    if not out.is_contiguous() or any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                                      for t in (q, k, v)):
        out = out.contiguous() if not out.is_contiguous() else out.clone()
    return out


def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float, ctx_id: int,
                    layer_idx: int) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


for _key in ("CPU", "CUDA"):
    _lib.impl("attention", attention, _key)
torch.library.register_fake("vllm_lite::attention", _attention_fake, lib=_lib)


# Projections: decode-sized ones (CUDA, where kernels/skinny_gemm.py's decode_config measured it faster) through the
# weight-streaming Triton kernel, everything else through F.linear. Opaque to Dynamo like attention, so the row-count
# branch runs at call time (and once per size at CUDA-graph capture). models/decoder.py's Linear calls it on CUDA
# when the model was built with KernelConfig.skinny_gemm (the default).
_lib.define("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from vllm_lite.kernels.skinny_gemm import HAS_TRITON, decode_config, skinny_gemm_triton
    config = decode_config(x.shape[0], *weight.shape) if x.dim() == 2 and weight.dim() == 2 else None
    if (config is not None and x.is_cuda and HAS_TRITON and bias is None and x.stride(1) == 1
            and weight.stride(1) == 1):
        return skinny_gemm_triton(x, weight, **config)
    return torch.nn.functional.linear(x, weight, bias)


def _skinny_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


for _key in ("CPU", "CUDA"):
    _lib.impl("skinny_linear", skinny_linear, _key)
torch.library.register_fake("vllm_lite::skinny_linear", _skinny_linear_fake, lib=_lib)
