"""Engine configuration: frozen dataclasses built once from keyword arguments (vLLM's names) and passed down."""
from __future__ import annotations

import dataclasses
import os
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
    # Largest prefill step replayed from a CUDA graph (graphs of 16, 32, 64, 96, 128, ... tokens, up to this and
    # max_num_batched_tokens; the step holds fewer tokens than its graph): a short prompt at an idle engine then costs
    # a replay, not an eager step (its TTFT). 0: none.
    max_prefill_graph_tokens: int = 512
    # Most requests a step replayed from a prefill graph may hold (graphs for 1, 2, 4, ... request slots, each at every
    # prefill-graph size): with more than 1, a short prompt joining a few running decodes replays a graph too instead
    # of an eager step. 16 measured on the H200 (`bench/gpu_check.sh serve-mixed`, qwen3-0.6b at 8 / 32 req/s): TTFT
    # p50 25.8 / 31.5 ms -> 8.0 / 9.5 ms and ITL p99 19.0 / 21.3 ms -> 2.3 / 2.5 ms against 1. 1: one-request only.
    prefill_graph_requests: int = 16
    # Inductor's C++ wrapper for the compiled forward: kernel launches from C++ instead of generated Python, for the
    # steps that run without a CUDA graph (prefills: TTFT). Off by default until measured on the GPU
    # (`bash bench/gpu_check.sh latency-cppw`); the first compile takes longer (a C++ build, cached on disk).
    inductor_cpp_wrapper: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.inductor_cpp_wrapper, bool):
            raise ValueError(f"inductor_cpp_wrapper={self.inductor_cpp_wrapper!r} is invalid; it must be True or "
                             f"False")
        _choice("device", self.device, DEVICES)
        _positive("max_cudagraph_capture_size", self.max_cudagraph_capture_size)
        _positive("prefill_graph_requests", self.prefill_graph_requests)
        if not isinstance(self.max_prefill_graph_tokens, int) or self.max_prefill_graph_tokens < 0:
            raise ValueError(f"max_prefill_graph_tokens={self.max_prefill_graph_tokens!r} is invalid; it must be an "
                             f"integer >= 0")
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)

    def replays_cuda_graphs(self) -> bool:
        """Whether the worker's decode and verification steps replay CUDA graphs (compiled on CUDA, FlashInfer)."""
        return self.resolved_device() == "cuda" and not self.enforce_eager and self.attention_backend != "torch"

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
    verify_as_decode: a speculative verification step attends as if each of its tokens were a one-token request
      (its own context length): FlashInfer's decode kernel and the decode CUDA graphs instead of the prefill kernel
      (+ merge) over 1 + k tokens per request. Off until measured on the GPU (an A/B: VLLM_LITE_VERIFY_AS_DECODE=1).
    """
    kv_write_kernel: bool = True
    sampling_kernel: bool = False
    skinny_gemm: bool = True
    flashinfer_tensor_cores: bool | None = None
    verify_as_decode: bool = False

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
    """How many ranks run the model and how many replicas serve it.
    tensor_parallel_size: worker processes of one engine, one per GPU, each holding a shard of every layer (NCCL on
      CUDA, gloo on CPU).
    data_parallel_size: independent engine-core + worker replicas behind one API server.
    data_parallel_rank: which replica an engine core is (set by the API server when it spawns replica i); its
      workers drive the devices data_parallel_rank * tensor_parallel_size + rank.
    distributed_init_method: torch.distributed init method of the ranks (e.g. tcp://host:port); None = a free local
      port (or MASTER_ADDR / MASTER_PORT when set, read in vllm_lite/envs.py)."""
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_init_method: str | None = None
    data_parallel_rank: int = 0

    def __post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("data_parallel_size", self.data_parallel_size)
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(f"data_parallel_rank must be in [0, {self.data_parallel_size}), got "
                             f"{self.data_parallel_rank}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size


@dataclass(frozen=True)
class RankConfig:
    """Who one worker is: its rank among world_size ranks and the local device index it drives."""
    rank: int = 0
    world_size: int = 1
    device_index: int = 0


SPEC_METHODS = ("ngram", "suffix", "grammar", "draft_model", "eagle", "eagle3")
# Methods whose drafter is a model run in the worker (the others propose on the engine core, from token ids).
SPEC_MODEL_METHODS = ("draft_model", "eagle", "eagle3")
MAX_SPEC_TOKENS = 15


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config` names): up to `num_speculative_tokens` draft tokens per
    request per step are verified in one forward (1 + k query tokens); the output distribution stays the target's.

    method: "ngram" / "suffix" (engine-core proposers over token ids, no model), "grammar" (a constrained request's
      drafts are the text its grammar forces next; n-gram lookup where nothing is forced), "draft_model" / "eagle" /
      "eagle3" (a drafter model from `model`, run in the worker); None: no speculation (or, with k > 0, a proposer
      handed to the EngineCore directly, as tests do). Given only `model`, the method is inferred as vLLM does.
    prompt_lookup_max / prompt_lookup_min (ngram, grammar): the longest / shortest suffix n-gram looked up (vLLM:
      both 5 when neither is given, one copies the other when only one is; grammar: 1 and 4, for JSON's short
      separators).
    suffix_decoding_* (suffix, vLLM's names): tree depth, cached earlier requests, draft length cap per matched
      token (max_spec_factor * match length) and the smallest continuation frequency a draft token needs.
    disable_by_batch_size: no drafts while more requests than this are running (a busy device gains little from
      verifying extra tokens and pays for proposing them); None: never.
    adaptive_draft_length: each request's draft length follows its measured acceptance and the batch size
      (spec_decode/adaptive.py states the rule); False: always up to k drafts.
    adaptive_saturation_tokens: tokens per step at which verifying one more token per request costs as much as a
      plain step (the device turns compute-bound); the adaptive rule's cost scale.
    adaptive_measured_costs: the rule's verifying-step overhead is measured (the engine's step times, plain against
      verifying, per batch size) where both kinds of step ran, instead of a fixed estimate. Off by default: on the
      H200 it turned n-gram speculation down on the edit workload (0.89x against 1.27x with the estimate).
    disable_padded_drafter_batch (vLLM's name; EAGLE heads): True makes every proposal take the host path, which
      waits for the step's tokens and stages each draft forward; by default the proposal after a uniform step (every
      request verified k drafts, or decoded one token; greedy or unseeded sampling; up to 8 requests) runs on the
      device in one graph (spec_decode/padded_proposal.py).
    """
    method: str | None = None
    model: str | None = None
    num_speculative_tokens: int | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    disable_by_batch_size: int | None = 64
    adaptive_draft_length: bool = True
    adaptive_saturation_tokens: int = 256
    adaptive_measured_costs: bool = False
    disable_padded_drafter_batch: bool = False

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:  # frozen: defaults resolved once, here
            object.__setattr__(self, name, value)

        method = self.method
        if method is None and self.model is not None:
            low = self.model.lower()
            method = "eagle3" if "eagle3" in low else "eagle" if "eagle" in low else "draft_model"
            set_("method", method)
        if method is not None:
            _choice("speculative method", method, SPEC_METHODS)
        if method in SPEC_MODEL_METHODS and not self.model:
            raise ValueError(f"speculative method {method!r} needs `model`: the path of the drafter's weights")
        if method is not None and method not in SPEC_MODEL_METHODS and self.model is not None:
            raise ValueError(f"speculative method {method!r} uses no model; remove `model` ({self.model!r})")
        k = self.num_speculative_tokens
        if k is None:
            k = min(self.suffix_decoding_max_tree_depth, MAX_SPEC_TOKENS) if method == "suffix" else 0
            if method is not None and method != "suffix":
                raise ValueError(f"speculative method {method!r} needs num_speculative_tokens (1..{MAX_SPEC_TOKENS})")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_SPEC_TOKENS:
            raise ValueError(f"num_speculative_tokens={k!r} is invalid; it must be an integer in "
                             f"[0, {MAX_SPEC_TOKENS}]")
        if method is not None and k == 0:
            raise ValueError(f"speculative method {method!r} needs num_speculative_tokens >= 1")
        set_("num_speculative_tokens", k)
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if method in ("ngram", "grammar"):
            default = (5, 5) if method == "ngram" else (1, 4)
            lo, hi = default if lo is None and hi is None else (lo if lo is not None else hi, hi if hi is not None
                                                                else lo)
            set_("prompt_lookup_min", lo)
            set_("prompt_lookup_max", hi)
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            _positive(name, getattr(self, name), allow_none=True)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"prompt_lookup_min={lo} is larger than prompt_lookup_max={hi}")
        _positive("suffix_decoding_max_tree_depth", self.suffix_decoding_max_tree_depth)
        _positive("suffix_decoding_max_cached_requests", self.suffix_decoding_max_cached_requests)
        if not (isinstance(self.suffix_decoding_max_spec_factor, (int, float))
                and self.suffix_decoding_max_spec_factor > 0):
            raise ValueError(f"suffix_decoding_max_spec_factor={self.suffix_decoding_max_spec_factor!r} is invalid; "
                             f"it must be a number > 0")
        if not (isinstance(self.suffix_decoding_min_token_prob, (int, float))
                and 0 <= self.suffix_decoding_min_token_prob <= 1):
            raise ValueError(f"suffix_decoding_min_token_prob={self.suffix_decoding_min_token_prob!r} is invalid; "
                             f"it must be in [0, 1]")
        _positive("disable_by_batch_size", self.disable_by_batch_size, allow_none=True)
        _positive("adaptive_saturation_tokens", self.adaptive_saturation_tokens)
        if not isinstance(self.adaptive_measured_costs, bool):
            raise ValueError(f"adaptive_measured_costs={self.adaptive_measured_costs!r} is invalid; it must be True "
                             f"or False")
        if not isinstance(self.disable_padded_drafter_batch, bool):
            raise ValueError(f"disable_padded_drafter_batch={self.disable_padded_drafter_batch!r} is invalid; it "
                             f"must be True or False")
        if not isinstance(self.adaptive_draft_length, bool):
            raise ValueError(f"adaptive_draft_length={self.adaptive_draft_length!r} is invalid; it must be True or "
                             f"False")

    @classmethod
    def from_any(cls, value: "SpeculativeConfig | dict[str, Any] | str | None", **flat: Any) -> "SpeculativeConfig":
        """`speculative_config` as vLLM takes it (a dict, a JSON string, or this class), then flat fields
        (num_speculative_tokens=..., None = not given); a field given both ways with different values is an error."""
        values = section_values(cls, "speculative_config", value)
        for key, v in flat.items():
            if v is None:
                continue
            if key in values and values[key] != v:
                raise ValueError(f"{key} is given twice with different values: {values[key]!r} in "
                                 f"speculative_config and {v!r}")
            values[key] = v
        return cls(**values)

    @property
    def enabled(self) -> bool:
        return self.num_speculative_tokens > 0

    @property
    def uses_model(self) -> bool:
        """The drafter is a model in the worker (not an engine-core proposer)."""
        return self.method in SPEC_MODEL_METHODS


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


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_fill_threads() -> int:
    """Bitmask fill threads for fill_threads=0: half the CPUs this process may use, 1 to 4 (xgrammar's own auto is
    half the hardware threads). On the 16-core H200 host, replaying a step's masks took 0.87 ms with 4 threads and
    0.92 ms with 8 (186 rows; 0.33 / 0.50 ms for 83 rows), and the other engine processes keep their cores."""
    return max(1, min(4, usable_cpus() // 2))


def auto_defer_fill() -> bool:
    """defer_fill for None: with 4 usable CPUs or more. On the 2-core development machine a fill on a thread beside
    the engine's Python did not overlap it (bench/tools/structured_host.py: +1.7 ms a step against +1.3 ms filled in
    line), and xgrammar's own threads slowed the fill itself (0.98 ms with 2 against 0.62 ms with 1)."""
    return usable_cpus() >= 4


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """Structured outputs (vLLM's `structured_outputs_config` names, plus the compile timeout).

    backend: "xgrammar" (the one backend; "auto" picks it).
    disable_any_whitespace / disable_additional_properties: engine-wide defaults, OR-ed with the request's own.
    compile_timeout_s: a grammar still compiling after this many seconds fails its request alone
      (`--structured-outputs-compile-timeout`).
    compile_threads: threads of the engine core's compile pool.
    fill_threads: xgrammar's threads filling a step's bitmask rows when enough constrained rows share a step; 0 (the
      default) means auto, resolved here to `auto_fill_threads()`: half the usable CPUs, at most 4 (the engine
      core, worker and API server processes need the rest).
    defer_fill: whether such a fill runs on a thread of its own while the engine core returns the step's outputs and
      schedules the next one (the step is sampled after it); false fills in the engine core's thread. None (the
      default) means auto, resolved here to `auto_defer_fill()`: with 4 usable CPUs or more.
    fill_switch_interval_ms: the interpreter's switch interval (`sys.setswitchinterval`) while a deferred fill runs on
      its thread: the thread needs the GIL to start and to return, and a busy caller gives it up only that often
      (5 ms by default), so the fill waited for the caller's Python instead of overlapping it (bench/tools/
      gil_handoff.py on the H200 machine: 0.4 ms of 1.8 hidden at 0.2 ms, none at 5 ms); 0 leaves it alone.
    """
    backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    compile_timeout_s: float = 10.0
    compile_threads: int = 4
    fill_threads: int = 0
    defer_fill: bool | None = None
    fill_switch_interval_ms: float = 0.2

    def __post_init__(self) -> None:
        if self.fill_threads == 0 and not isinstance(self.fill_threads, bool):
            object.__setattr__(self, "fill_threads", auto_fill_threads())
        if self.defer_fill is None:
            object.__setattr__(self, "defer_fill", auto_defer_fill())
        _choice("structured_outputs_config.backend", self.backend, STRUCTURED_OUTPUT_BACKENDS)
        for name in ("disable_any_whitespace", "disable_additional_properties", "defer_fill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs_config.{name}={getattr(self, name)!r} is invalid; it must be "
                                 f"true or false")
        t = self.compile_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"structured outputs compile timeout {t!r} is invalid; it must be a number of seconds "
                             f"> 0")
        _positive("structured_outputs_config.compile_threads", self.compile_threads)
        _positive("structured_outputs_config.fill_threads", self.fill_threads)
        t = self.fill_switch_interval_ms
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 100:
            raise ValueError(f"structured_outputs_config.fill_switch_interval_ms={t!r} is invalid; it must be a "
                             f"number of milliseconds in [0, 100] (0: the interpreter's own)")

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

    def __post_init__(self) -> None:
        if self.parallel.tensor_parallel_size > 1 and self.speculative.uses_model:
            raise ValueError(f"speculative method {self.speculative.method!r} (a drafter model in the worker) is not "
                             f"supported with tensor_parallel_size > 1; use ngram or suffix")

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
        # Speculative `model` / `method` only inside speculative_config (the flat `model` is the target's).
        owner = {f.name: name for name, klass in sections.items() for f in dataclasses.fields(klass)
                 if not (name == "speculative" and f.name in ("model", "method"))}
        spec = kwargs.pop("speculative_config", None)
        for key, value in kwargs.items():
            if key not in owner:
                raise ValueError(f"unknown engine argument {key!r}; known: {', '.join(sorted(owner))}")
            if value is not None:
                parts[owner[key]][key] = value
        if parts["model"].get("model") is None:
            parts["model"]["model"] = DEFAULT_MODEL
        speculative = SpeculativeConfig.from_any(spec, **parts.pop("speculative"))
        return cls(**{name: getattr(klass, "from_env", klass)(**parts[name]) for name, klass in sections.items()
                      if name != "speculative"}, speculative=speculative)
