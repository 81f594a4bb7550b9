"""The one place that reads environment variables; everything else takes explicit values from here or the config.

- XDG_CACHE_HOME: root of the cache (converted GGUF models, torch.compile cache) -> $XDG_CACHE_HOME/vllm_lite.
- VLLM_LITE_COMPILE_CACHE: folder of the persistent torch.compile cache (default <cache root>/torch_compile).
- PYTHONPYCACHEPREFIX: if unset, `serve` sets it to <cache root>/pycache for its processes (bytecode cache).
- VLLM_LITE_BYTECODE_CACHE=0: `serve` leaves bytecode caching to Python's own settings (default 1: cache bytecode
  under <cache root>/pycache even where PYTHONDONTWRITEBYTECODE is set, as container images do to keep .pyc files
  out of their layers; nothing is written next to any source file).
- VLLM_LITE_API_KEY: the server's API key when --api-key is not given.
- VLLM_LITE_BODY_READ_TIMEOUT_S: seconds the server waits for more of a request body before a 408 (default 30).
- VLLM_LITE_CHAT_TEMPLATE_TIMEOUT_S: seconds a request-supplied chat template may render before it is stopped and
  the request is a 400 (default 5; only with --trust-request-chat-template).
- MASTER_ADDR / MASTER_PORT: where tensor-parallel ranks meet (torch.distributed's usual variables) when
  --distributed-init-method is not given; unset: a free local port.
- NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1: written (never read) before worker
  processes start, so no rank uses NVLink multicast (it can take a host's GPUs down).

Kernel switches: these only set the defaults of vllm_lite.config.KernelConfig (read once, by `kernel_defaults()`,
when an EngineConfig is built; the engine arguments kv_write_kernel, sampling_kernel, skinny_gemm and
flashinfer_tensor_cores override them). Nothing reads them per forward: the config is passed down at construction.
- VLLM_LITE_KV_WRITE_KERNEL=0: use the torch reference instead of the Triton KV-cache write (A/B, debugging).
- VLLM_LITE_SAMPLING_KERNEL=1: use the Triton top-k/top-p/min-p kernel instead of the torch path (off by default:
  it measured slower on the H100, see docs/PERF.md).
- VLLM_LITE_SKINNY_GEMM=0: every projection through cuBLAS (default 1: decode-sized ones of small models through
  kernels/skinny_gemm.py, where it measured faster; see its decode_config).
- VLLM_LITE_FLASHINFER_TENSOR_CORES=0 / 1: FlashInfer's CUDA-core (0) or tensor-core (1) decode kernels (unset:
  automatic, which is the tensor-core family; for A/B measurements; the tensor-core variant may JIT-compile on
  first use).
- VLLM_LITE_VERIFY_AS_DECODE=1: speculative verification steps attend with the decode kernel, one row per token
  (KernelConfig.verify_as_decode; off by default until measured).
"""
from __future__ import annotations

import os


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vllm_lite")


def compile_cache_dir() -> str:
    return os.environ.get("VLLM_LITE_COMPILE_CACHE") or os.path.join(cache_root(), "torch_compile")


def bytecode_cache_dir() -> str | None:
    """Where `serve` keeps Python bytecode (None: the user set PYTHONPYCACHEPREFIX, or turned it off)."""
    if os.environ.get("PYTHONPYCACHEPREFIX") or os.environ.get("VLLM_LITE_BYTECODE_CACHE", "1") == "0":
        return None
    return os.path.join(cache_root(), "pycache")


def distributed_master() -> tuple[str, str] | None:
    """(MASTER_ADDR, MASTER_PORT) when both are set."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return (addr, port) if addr and port else None


NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_nvlink_multicast() -> None:
    """Set NO_MULTICAST in this process's environment (inherited by every process it starts afterwards)."""
    os.environ.update(NO_MULTICAST)


def api_key() -> str | None:
    return os.environ.get("VLLM_LITE_API_KEY") or None


def _positive_seconds(var: str, default: str) -> float:
    text = os.environ.get(var, default)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{var}={text!r} is invalid; use a number of seconds > 0")
    return value


def body_read_timeout_s() -> float:
    return _positive_seconds("VLLM_LITE_BODY_READ_TIMEOUT_S", "30")


def chat_template_timeout_s() -> float:
    return _positive_seconds("VLLM_LITE_CHAT_TEMPLATE_TIMEOUT_S", "5")


_KERNEL_VARS = (("kv_write_kernel", "VLLM_LITE_KV_WRITE_KERNEL"),
                ("sampling_kernel", "VLLM_LITE_SAMPLING_KERNEL"),
                ("skinny_gemm", "VLLM_LITE_SKINNY_GEMM"),
                ("flashinfer_tensor_cores", "VLLM_LITE_FLASHINFER_TENSOR_CORES"),
                ("verify_as_decode", "VLLM_LITE_VERIFY_AS_DECODE"))
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def kernel_defaults() -> dict[str, bool]:
    """The KernelConfig fields the environment sets (only variables that are set; KernelConfig holds the defaults).
    Called by KernelConfig.from_env when the engine config is built, never per forward."""
    values: dict[str, bool] = {}
    for name, var in _KERNEL_VARS:
        value = os.environ.get(var, "").strip().lower()
        if value in _TRUE or value in _FALSE:
            values[name] = value in _TRUE
        elif value:
            raise ValueError(f"{var}={os.environ[var]!r} is invalid; use 1 or 0")
    return values
