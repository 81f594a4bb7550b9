"""Engine configuration: frozen dataclasses built once from keyword arguments (vLLM's names) and passed down."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cuda", "cpu")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "flashinfer")
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; allowed values: {', '.join(map(repr, allowed))}")


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid; it must be a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    skip_tokenizer_init: bool = False
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _positive("max_model_len", self.max_model_len, allow_none=True)
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is invalid; it must be an integer")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        _positive("num_gpu_blocks_override", self.num_gpu_blocks_override, allow_none=True)
        _positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes, allow_none=True)
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(
                f"gpu_memory_utilization={self.gpu_memory_utilization!r} is invalid; it must be in (0, 1]")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # Schedule step N+1 while step N runs on the device (its sampled tokens feed N+1 on the device); stop checks
    # then see each token one step later and a finished request may compute one extra, discarded token.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"
    enforce_eager: bool = False
    attention_backend: str = "auto"
    # Largest decode batch replayed from a CUDA graph (sizes 1, 2, 4, 8, 16, 24, ... up to min(this, max_num_seqs));
    # larger decode batches run compiled without a graph.
    max_cudagraph_capture_size: int = 512

    def __post_init__(self) -> None:
        _choice("device", self.device, DEVICES)
        _positive("max_cudagraph_capture_size", self.max_cudagraph_capture_size)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class LoadConfig:
    load_format: str = "auto"
    download_dir: str | None = None

    def __post_init__(self) -> None:
        _choice("load_format", self.load_format, LOAD_FORMATS)


@dataclass(frozen=True)
class KernelConfig:
    """Which optional kernels run; chosen once when the config is built and passed down at construction (the model
    runner hands it to make_backend, the Sampler and load_model); nothing reads a switch per forward.
    `from_env` (EngineConfig's default and from_kwargs) starts from the environment (vllm_lite.envs.kernel_defaults:
    VLLM_LITE_KV_WRITE_KERNEL, ...); engine arguments of the same names override it.

    kv_write_kernel: the Triton paged KV-cache write on CUDA (False: the torch reference).
    sampling_kernel: the Triton top-k/top-p/min-p threshold search on CUDA (default off: slower on the H100).
    skinny_gemm: decode-sized CUDA projections through kernels/skinny_gemm.py where it measured faster than cuBLAS.
    flashinfer_tensor_cores: FlashInfer's tensor-core (True) or CUDA-core (False) decode kernels; None: automatic.
    """
    kv_write_kernel: bool = True
    sampling_kernel: bool = False
    skinny_gemm: bool = True
    flashinfer_tensor_cores: bool | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> "KernelConfig":
        """The environment's settings (read once, here), then `overrides` (None = not given)."""
        from vllm_lite import envs
        values = envs.kernel_defaults()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, bool) or (value is None and f.name == "flashinfer_tensor_cores")):
                raise ValueError(f"{f.name}={value!r} is invalid; it must be True or False"
                                 + (" (or None: automatic)" if f.name == "flashinfer_tensor_cores" else ""))


@dataclass(frozen=True)
class ParallelConfig:
    """How many ranks run the model. The executor starts one worker per rank; tensor parallelism (sharded layers
    over NCCL) is not built yet, so today only one rank is allowed."""
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} is not supported yet; use 1")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size


@dataclass(frozen=True)
class RankConfig:
    """Who one worker is: its rank among world_size ranks and the local device index it drives."""
    rank: int = 0
    world_size: int = 1
    device_index: int = 0


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: up to `num_speculative_tokens` draft tokens per request per step are verified in one
    forward (1 + k query tokens). The runner captures CUDA graphs for 1 + k tokens per request; the scheduler keeps
    a speculating request's steps in order (its next step waits for the accepted tokens)."""
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.num_speculative_tokens, int) or not 0 <= self.num_speculative_tokens <= 15:
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens!r} is invalid; it must be an "
                             f"integer in [0, 15]")

    @property
    def enabled(self) -> bool:
        return self.num_speculative_tokens > 0


def section_values(cls: type, name: str, value: Any) -> dict[str, Any]:
    """The fields of config section `cls` given as vLLM takes a `*_config` argument: an instance, a dict, a JSON
    string or None; ValueError naming `name` for bad JSON, a non-object or unknown fields."""
    if isinstance(value, cls):
        value = dataclasses.asdict(value)
    elif isinstance(value, str):
        import json
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value or {}, dict):
        raise ValueError(f"{name}={value!r} is invalid; it must be a dict (JSON object)")
    values = dict(value or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {name} field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return values


STRUCTURED_OUTPUT_BACKENDS = ("auto", "xgrammar")


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """Structured outputs (vLLM's `structured_outputs_config` names, plus the compile timeout).

    backend: "xgrammar" (the one backend; "auto" picks it).
    disable_any_whitespace / disable_additional_properties: engine-wide defaults, OR-ed with the request's own.
    compile_timeout_s: a grammar still compiling after this many seconds fails its request alone
      (`--structured-outputs-compile-timeout`).
    compile_threads: threads of the engine core's compile pool.
    fill_threads: threads that fill a step's bitmask rows when enough constrained rows share a step.
    """
    backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    compile_timeout_s: float = 10.0
    compile_threads: int = 4
    fill_threads: int = 4

    def __post_init__(self) -> None:
        _choice("structured_outputs_config.backend", self.backend, STRUCTURED_OUTPUT_BACKENDS)
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs_config.{name}={getattr(self, name)!r} is invalid; it must be "
                                 f"true or false")
        t = self.compile_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"structured outputs compile timeout {t!r} is invalid; it must be a number of seconds "
                             f"> 0")
        _positive("structured_outputs_config.compile_threads", self.compile_threads)
        _positive("structured_outputs_config.fill_threads", self.fill_threads)

    @classmethod
    def from_any(cls, value: "StructuredOutputsConfig | dict[str, Any] | str | None",
                 compile_timeout_s: float | None = None) -> "StructuredOutputsConfig":
        """From a dict, a JSON string (the CLI's --structured-outputs-config) or this class; unknown keys are an
        error; `compile_timeout_s` (--structured-outputs-compile-timeout) overrides the value's."""
        values = section_values(cls, "structured_outputs_config", value)
        if compile_timeout_s is not None:
            values["compile_timeout_s"] = compile_timeout_s
        return cls(**values)


def offline_batch_defaults(device: str) -> dict[str, int]:
    """vLLM's scheduler defaults for the offline `LLM` class: prefill chunks of 16384 tokens and 1024 sequences on
    GPUs of >= 70 GiB other than the A100 (H100, H200, MI300X), SchedulerConfig's 8192 / 256 elsewhere. The API
    server keeps SchedulerConfig's. Querying the GPU initialises CUDA: only for processes that run the model."""
    if not DeviceConfig(device).resolved_device().startswith("cuda"):
        return {}
    import torch
    props = torch.cuda.get_device_properties(torch.device(DeviceConfig(device).resolved_device()))
    if props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower():
        return {"max_num_batched_tokens": 16384, "max_num_seqs": 1024}
    return {}


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig.from_env)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Split flat vLLM-style keyword arguments into the section dataclasses; unknown names are an error.
        `structured_outputs_config` (dict / JSON / StructuredOutputsConfig) and `structured_outputs_compile_timeout`
        build the structured_outputs section."""
        if "structured_outputs_config" in kwargs or "structured_outputs_compile_timeout" in kwargs:
            so = StructuredOutputsConfig.from_any(kwargs.pop("structured_outputs_config", None),
                                                  kwargs.pop("structured_outputs_compile_timeout", None))
            return dataclasses.replace(cls.from_kwargs(**kwargs), structured_outputs=so)
        sections = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                    "device": DeviceConfig, "load": LoadConfig, "kernels": KernelConfig,
                    "parallel": ParallelConfig, "speculative": SpeculativeConfig}
        parts: dict[str, dict[str, Any]] = {name: {} for name in sections}
        owner = {f.name: name for name, klass in sections.items() for f in dataclasses.fields(klass)}
        for key, value in kwargs.items():
            if key not in owner:
                raise ValueError(f"unknown engine argument {key!r}; known: {', '.join(sorted(owner))}")
            if value is not None:
                parts[owner[key]][key] = value
        if parts["model"].get("model") is None:
            parts["model"]["model"] = DEFAULT_MODEL
        return cls(**{name: getattr(klass, "from_env", klass)(**parts[name]) for name, klass in sections.items()})
