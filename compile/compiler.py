"""torch.compile of the model forward: inductor, one graph for every token count, no graph breaks, on-disk cache.

- Dynamic token dimension: dim 0 of input_ids / positions is marked dynamic (mark_dynamic) on every call and
  compiled with torch's `backed_size_oblivious`, so Dynamo neither specialises sizes 0/1 nor guards on the size:
  sizes 1, 2, 7, 8192 all run ONE compiled graph. Not `mark_unbacked`: it gives input_ids and positions two
  unrelated size symbols, and inductor then cannot prove that buffers derived from each have the same size and
  stops fusing across them (seen in its fusion log: "no shared data"; the H100 profile showed each RMSNorm as a
  reduction kernel plus a pointwise kernel). One backed symbol shared by both fuses them.
- fullgraph=True: a graph break is an error at the first call, not a silent slowdown. Attention is the opaque custom
  op `vllm_lite::attention` (compile/custom_ops.py), so Dynamo never traces a backend.
- Persistent cache: `configure_compile_cache` is the ONE place that sets the compile-cache settings. It sets, before
  anything is compiled, TORCHINDUCTOR_CACHE_DIR (default ~/.cache/vllm_lite/torch_compile; override with the
  `cache_dir` argument or the VLLM_LITE_COMPILE_CACHE environment variable), TORCHINDUCTOR_FX_GRAPH_CACHE=1,
  TORCHINDUCTOR_AUTOGRAD_CACHE=1, torch._inductor.config.fx_graph_cache = True and
  torch._functorch.config.enable_autograd_cache = True. Environment variables are set too so that inductor's
  compile worker processes and Triton (cache under <dir>/triton) use the same folder. A second start then skips
  AOTAutograd and inductor codegen/compilation (Dynamo still traces the Python, which is fast).
- The first call's time (Dynamo + inductor) is logged as the compile time; a later recompile is logged as a warning.
  Inputs are given to the compiled graph at storage offset 0 (views into the model runner's packed input buffer
  are copied into persistent buffers), because Dynamo guards on offsets and would otherwise compile twice.
- config.device.enforce_eager: no compilation, the plain forward is returned.
"""
from __future__ import annotations

import logging
import os
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from vllm_lite import envs

logger = logging.getLogger("vllm_lite.compile")



def configure_compile_cache(cache_dir: str | None = None) -> str:
    """Turn on inductor's FX-graph cache and the AOTAutograd cache in one folder; returns the folder.

    Precedence: `cache_dir` argument, then $VLLM_LITE_COMPILE_CACHE, then ~/.cache/vllm_lite/torch_compile. Call it
    before the first torch.compile of the process (compile_model does)."""
    path = os.path.abspath(os.path.expanduser(cache_dir or envs.compile_cache_dir()))
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return path


def _mark_tokens_dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


def _size_oblivious() -> Any:
    """Backed symbols reasoned about size-obliviously: no 0/1 specialisation, no guard on the token count."""
    import torch.fx.experimental._config as fx_config
    return fx_config.patch(backed_size_oblivious=True)


def _cache_stats() -> str:
    """Compile-cache hits and misses so far (a warm start should show hits and no misses)."""
    from torch._dynamo.utils import counters
    ind, aot = counters["inductor"], counters["aot_autograd"]
    return (f"FX graph cache {ind['fxgraph_cache_hit']} hit / {ind['fxgraph_cache_miss']} miss, "
            f"AOTAutograd cache {aot['autograd_cache_hit']} hit / {aot['autograd_cache_miss']} miss")


def _graph_count() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _own_code(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`forward` with a code object of its own. Dynamo caches compiled graphs on the code object and guards on
    `self`, so every model instance of one class in a process (a draft model beside its target, engines built one
    after another) would add an entry to one shared cache and hit its recompile limit (8); a copy per instance keeps
    one entry each, dropped with the instance. Inductor's on-disk cache keys on the graph, so it still hits."""
    func = getattr(forward, "__func__", None)
    if func is None or not isinstance(func, types.FunctionType):
        return forward
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__qualname__ = func.__qualname__
    return types.MethodType(copy, forward.__self__)


class CompiledForward:
    """`forward(input_ids, positions) -> hidden` running the torch.compile'd model forward."""

    def __init__(self, forward: Callable[..., torch.Tensor], backend: str | Callable = "inductor",
                 fullgraph: bool = True, options: dict[str, Any] | None = None) -> None:
        self.eager_forward = forward
        self.compiled = torch.compile(_own_code(forward), backend=backend, fullgraph=fullgraph, dynamic=None,
                                      options=options if backend == "inductor" else None)
        self.num_calls = 0
        self.compile_seconds = 0.0
        self._graphs_seen: int | None = None
        self._buffers: list[torch.Tensor | None] = [None, None]
        self.num_recompiles = 0

    def _at_offset0(self, slot: int, t: torch.Tensor) -> torch.Tensor:
        """Copy into a persistent buffer (a plain tensor, not an inference tensor: Dynamo guards on that too)."""
        buf = self._buffers[slot]
        if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype or buf.device != t.device:
            with torch.inference_mode(False):
                buf = torch.empty(max(t.numel(), 1024), dtype=t.dtype, device=t.device)
            self._buffers[slot] = buf
        out = buf[: t.numel()]
        out.copy_(t)
        return out

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Dynamo guards on storage offsets (0 vs >= 2): views into a packed buffer would compile a second graph.
        if input_ids.storage_offset():
            input_ids = self._at_offset0(0, input_ids)
        if positions.storage_offset():
            positions = self._at_offset0(1, positions)
        _mark_tokens_dynamic(input_ids, positions)
        if self.num_calls:
            with _size_oblivious():
                out = self.compiled(input_ids, positions)
            if _graph_count() != self._graphs_seen:  # a recompile (or another model compiled meanwhile)
                self._graphs_seen = _graph_count()
                self.num_recompiles += 1
                logger.warning("torch.compile recompiled the model forward (%d tokens)", input_ids.shape[0])
            self.num_calls += 1
            return out
        start = time.perf_counter()
        with _size_oblivious():
            out = self.compiled(input_ids, positions)
        self.compile_seconds = time.perf_counter() - start
        self._graphs_seen = _graph_count()
        self.num_calls += 1
        logger.info("torch.compile: model forward compiled in %.2f s (first call, %d tokens; %s)",
                    self.compile_seconds, input_ids.shape[0], _cache_stats())
        return out


def compile_model(model: torch.nn.Module, config: Any = None, *, cache_dir: str | None = None,
                  backend: str | Callable = "inductor") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The callable the model runner uses instead of model.forward: model.forward itself when
    config.device.enforce_eager, else a CompiledForward (compiled lazily at the first call, logged)."""
    if config is not None and config.device.enforce_eager:
        logger.info("enforce_eager: torch.compile and CUDA graphs disabled")
        return model.forward
    path = configure_compile_cache(cache_dir)
    logger.info("torch.compile (%s, dynamic token dimension, fullgraph); compile cache in %s",
                backend if isinstance(backend, str) else getattr(backend, "__name__", "custom"), path)
    # Round intermediates where eager rounds them, so compiled and eager greedy outputs agree in bf16/fp16.
    options: dict[str, Any] = {"emulate_precision_casts": True}
    if config is not None and config.device.inductor_cpp_wrapper:
        options["cpp_wrapper"] = True  # kernel launches from a C++ wrapper (the steps outside CUDA graphs)
    return CompiledForward(model.forward, backend=backend, options=options)
