"""Engine command-line flags (vLLM's names) -> EngineConfig keyword arguments: the one definition, used by
`vllm-lite serve`, `vllm-lite bench` (vllm_lite/benchmarks, with its own defaults set on top) and bench/*.py."""
from __future__ import annotations

import argparse
import json
from typing import Any

from vllm_lite import envs
from vllm_lite.config import (ATTENTION_BACKENDS, DEFAULT_MODEL, DEVICES, DTYPES, LOAD_FORMATS, CacheConfig,
                              DeviceConfig, SchedulerConfig)

API_KEY_ENV = "VLLM_LITE_API_KEY"
DEFAULT_SHUTDOWN_TIMEOUT = 0.0  # vLLM's default: on SIGTERM in-flight requests are aborted at once
# 32 MiB: far above any prompt that fits a context window (128k tokens of text are ~0.5 MiB, as token ids ~1 MiB),
# far below what strains the server's memory; larger bodies get a 413 before they are parsed
DEFAULT_MAX_REQUEST_BODY_BYTES = 32 * 2 ** 20
# The server closes a connection idle this long (uvicorn's and vLLM's default). Clients of many requests (evals,
# bench serve) drop idle connections sooner (CLIENT_KEEP_ALIVE_S): with equal times a client may send on a
# connection the server is closing that instant, and the request fails with a connection error (2 of 1,319 GSM8K
# questions at concurrency 256 did on the H200).
SERVER_KEEP_ALIVE_S = 5
CLIENT_KEEP_ALIVE_S = 2.0

# flag dest -> EngineConfig.from_kwargs name (identical today; kept explicit so server-only flags stay out)
ENGINE_ARGS = ("model", "tokenizer", "dtype", "seed", "max_model_len", "served_model_name", "block_size",
               "enable_prefix_caching", "gpu_memory_utilization", "num_gpu_blocks_override", "kv_cache_memory_bytes",
               "max_num_seqs", "max_num_batched_tokens", "async_scheduling", "device", "enforce_eager",
               "attention_backend", "max_cudagraph_capture_size", "max_prefill_graph_tokens", "inductor_cpp_wrapper",
               "prefill_graph_requests", "load_format", "download_dir", "skip_tokenizer_init",
               "speculative_config", "structured_outputs_config", "structured_outputs_compile_timeout",
               "tensor_parallel_size", "data_parallel_size", "distributed_init_method")


def _size(text: str) -> int:
    """Byte counts like 1073741824, 512M, 4G, 1.5GiB."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" and t[-1:] else t
    try:
        return int(float(num) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 1073741824, 512M, 4G)") from None


def _json_object(text: str) -> dict[str, Any]:
    """--speculative-config '{"method": "ngram", ...}' (vLLM's flag): a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def add_engine_args(parser: argparse.ArgumentParser, model_help: str | None = None) -> argparse.ArgumentParser:
    """Add the engine flags; their dests are EngineConfig.from_kwargs names (see engine_kwargs_from_args), except
    --model's (`model_flag`, beside a positional MODEL where there is one). Tools change defaults with
    parser.set_defaults(dtype=..., model_flag=...)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                   help=model_help or f"model to serve: a local HF-layout folder, a .gguf file, a Hugging Face repo "
                                      f"id, or {DEFAULT_MODEL!r} (the built-in default). Same as the positional MODEL.")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or repo id (default: the model's)")
    g.add_argument("--skip-tokenizer-init", action=argparse.BooleanOptionalAction, default=False,
                   help="load no tokenizer: prompts must be token ids and outputs carry no text (benchmarks)")
    g.add_argument("--served-model-name", default=None,
                   help="model name clients must send in `model` and that /v1/models lists "
                        "(default: MODEL as given)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weight and activation dtype; auto = the checkpoint's dtype on GPU, float32 on CPU")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context window in tokens (prompt + output); default: the model's maximum")
    g.add_argument("--seed", type=int, default=0, help="random seed for the engine (sampling without a seed)")
    g.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="weights format; 'dummy' builds random weights from config.json (benchmarks)")
    g.add_argument("--download-dir", default=None, help="cache folder for downloaded / converted models")

    g = parser.add_argument_group("cache")
    g.add_argument("--block-size", type=int, default=CacheConfig.block_size, help="KV-cache block size in tokens")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of shared prompt prefixes (--no-enable-prefix-caching turns it off)")
    g.add_argument("--gpu-memory-utilization", type=float, default=CacheConfig.gpu_memory_utilization,
                   help="fraction of GPU memory the engine may use (weights + activations + KV cache)")
    g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="use exactly this many KV-cache blocks instead of profiling")
    g.add_argument("--kv-cache-memory-bytes", type=_size, default=None,
                   help="KV-cache size in bytes (e.g. 2G); overrides --gpu-memory-utilization for the cache")

    g = parser.add_argument_group("scheduler")
    g.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs,
                   help="most sequences in one batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens,
                   help="token budget of one engine step (prefills are chunked to fit)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="schedule and prepare the next step while the device runs the current one "
                        "(--no-async-scheduling waits for every step's tokens first)")

    g = parser.add_argument_group("device")
    g.add_argument("--device", default="auto", choices=DEVICES, help="where the model runs (auto: cuda if present)")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="no torch.compile and no CUDA graphs (faster start, slower steps)")
    g.add_argument("--max-cudagraph-capture-size", type=int, default=DeviceConfig.max_cudagraph_capture_size,
                   help="largest decode batch replayed from a CUDA graph (graphs for 1, 2, 4, 8, 16, 24, ... up to "
                        "this and max_num_seqs); larger batches run compiled without a graph")
    g.add_argument("--max-prefill-graph-tokens", type=int, default=DeviceConfig.max_prefill_graph_tokens,
                   help="largest prefill step replayed from a CUDA graph (graphs of 16, 32, 64, 96, 128, ... "
                        "tokens up to this): the time to first token of a short prompt at an idle server; 0: none")
    g.add_argument("--prefill-graph-requests", type=int, default=DeviceConfig.prefill_graph_requests,
                   help="most requests in a step replayed from a prefill graph (graphs for 1, 2, 4, ... request "
                        "slots, default 16): a short prompt joining a few running decodes replays a graph instead of an "
                        "eager step; 1: one-request prefills only")
    g.add_argument("--inductor-cpp-wrapper", action=argparse.BooleanOptionalAction, default=False,
                   help="experimental, CUDA: torch.compile with inductor's C++ wrapper, so steps without a CUDA "
                        "graph (prefills) launch their kernels from C++ (a slower first compile, cached on disk); "
                        "no effect where the model runs eager (CPU, --enforce-eager), which is logged")
    g.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="attention kernels: torch (reference, any device) or flashinfer (GPU)")

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="worker processes (one per GPU) each holding a shard of every layer")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="independent engine replicas behind one API server (requests go to the least loaded)")
    g.add_argument("--distributed-init-method", default=None, metavar="URL",
                   help="torch.distributed init method of the tensor-parallel ranks, e.g. tcp://10.0.0.1:29500 "
                        "(default: MASTER_ADDR / MASTER_PORT if set, else a free local port)")

    g = parser.add_argument_group("speculative decoding")
    g.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='speculative decoding as a JSON object with vLLM\'s fields, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 3, "prompt_lookup_max": 4}\' (methods: ngram, suffix, '
                        'grammar, draft_model, eagle, eagle3; the model methods also need "model")')

    g = parser.add_argument_group("structured outputs")
    g.add_argument("--structured-outputs-config", type=_json_object, default=None, metavar="JSON",
                   help='structured outputs as a JSON object with vLLM\'s fields, e.g. \'{"backend": "xgrammar", '
                        '"disable_any_whitespace": true}\' (also disable_additional_properties, compile_timeout_s, '
                        'compile_threads, fill_threads, defer_fill, fill_switch_interval_ms)')
    g.add_argument("--structured-outputs-compile-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="a request whose grammar is still compiling after this many seconds fails alone with "
                        "finish_reason 'error' (default 10)")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r} (a finite number >= 0)")
    return value


def add_shutdown_args(group: Any) -> None:
    """`vllm-lite serve`'s --shutdown-timeout (vLLM's name and default)."""
    group.add_argument("--shutdown-timeout", type=_seconds, default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="SECONDS",
                       help="on SIGTERM / SIGINT: stop accepting requests, let in-flight ones finish for up to this "
                            "many seconds, then end the rest with finish_reason 'abort' and exit (0: abort at once; "
                            "a second signal aborts at once too)")


TOOL_CALL_PARSERS = ("hermes",)  # entrypoints/openai/tool_parsers.py


def add_tool_args(group: Any) -> None:
    """`vllm-lite serve`'s tool-calling flags (vLLM's names): tool_choice "auto" needs both."""
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='allow tool_choice "auto": the model decides whether to call tools, and the calls are '
                            "parsed out of its text by --tool-call-parser")
    group.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                       help="how tool calls are written in the model's text (hermes: <tool_call>{...}</tool_call>, "
                            "Qwen2.5/Qwen3/Hermes chat templates)")


def tool_parser_from_args(args: argparse.Namespace) -> str | None:
    """The parser for tool_choice "auto", or None when it is off; ValueError for an incomplete pair of flags."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (e.g. --tool-call-parser hermes)")
    return args.tool_call_parser if args.enable_auto_tool_choice else None


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig.from_kwargs(**result) for parsed flags; MODEL positional or --model (not both, unless equal)."""
    positional = getattr(args, "model", None)
    flag = getattr(args, "model_flag", None)
    if positional and flag and positional != flag:
        raise ValueError(f"the model is given twice: positional {positional!r} and --model {flag!r}")
    kwargs: dict[str, Any] = {}
    for name in ENGINE_ARGS:
        if name == "model":
            kwargs["model"] = flag or positional or DEFAULT_MODEL
        elif hasattr(args, name):
            kwargs[name] = getattr(args, name)
    return kwargs


def engine_argv(kwargs: dict[str, Any]) -> list[str]:
    """`vllm-lite serve` arguments (MODEL first) for engine kwargs, e.g. engine_kwargs_from_args's result: what a
    script that starts a server passes on (None values are left out: the server's default)."""
    argv = [str(kwargs.get("model") or DEFAULT_MODEL)]
    for name in ENGINE_ARGS:
        value = kwargs.get(name)
        if name == "model" or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):  # every bool flag is a BooleanOptionalAction: --x / --no-x
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def resolve_api_key(flag: str | None) -> str | None:
    """--api-key wins; else VLLM_LITE_API_KEY; empty means none. The only place the environment is read."""
    return flag or envs.api_key()
