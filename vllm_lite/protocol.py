"""Every message that crosses a process boundary, and its codec (msgspec msgpack; never pickle).

Both ends of each socket import this module and nothing above them: the API server and the engine core share the
front-end messages, the engine core and the workers share the step messages and the worker RPC Structs. It stays
light (no torch, no transformers): the API server imports it.

Each direction has a tagged union of the Structs it may carry, so the receiver decodes into typed objects and a
malformed or foreign message fails to decode instead of executing. Worker calls are one Struct per call (no
method-name strings).
"""
from __future__ import annotations

from typing import Any, Union

import msgspec

from vllm_lite.sampling_params import SamplingParams


# ---- front end (offline LLM / API server) <-> engine core ------------------------------------------------------
class EngineCoreRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    # The tokenizer's EOS (the front end knows it); None: the model's first EOS id. The engine core resolves the
    # whole stop policy (every EOS id, stop ids, ignore_eos, min_tokens) from it once, at admission.
    eos_token_id: int | None = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    # Per new token: [(token_id, logprob, rank), ...] with the sampled token first, then the top-N.
    new_logprobs: list[list[tuple[int, float, int]]] | None = None
    # "stop" | "length" | "abort" | "error" (the request itself failed, e.g. its grammar did not compile in time;
    # stop_reason then says why)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # Speculative decoding in this output's step: drafts verified and of those accepted (per request totals are
    # their sums; RequestOutput.num_accepted_tokens).
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # SamplingParams.prompt_logprobs: per prompt token after the first, [(token_id, logprob, rank), top-N...]
    # (the prompt token first); sent once, with the request's first new token.
    prompt_logprobs: list[list[tuple[int, float, int]]] | None = None
    # With the last output only: the engine core's monotonic [queued, first scheduled, first token, finished]
    # (None where the request never got that far), for the request-level histograms in /metrics.
    timings: list[float | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    # Speculative decoding (cumulative): verifications (steps of one request with >= 1 draft), draft tokens
    # verified and accepted, and accepted drafts per position (index i: the (i+1)-th draft of a verification).
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_drafts: int = 0
    num_accepted_tokens_per_pos: list[int] = []


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    scheduler_stats: SchedulerStats | None = None


class AbortRequests(msgspec.Struct, array_like=True, tag=True):
    request_ids: list[str]


class EngineReady(msgspec.Struct, array_like=True, tag=True):
    num_blocks: int


class EngineDead(msgspec.Struct, array_like=True, tag=True):
    reason: str


class ModelDescription(msgspec.Struct, array_like=True, tag=True):
    """A resolved model as it travels (the worker resolves it; the engine core and the API server receive it).
    model_loader's ModelInfo is this plus the parsed config; `describe_model` strips that off."""
    model: str  # the name the user gave
    path: str  # local HF-layout folder (config.json + weights, unless load_format == "dummy")
    architecture: str  # e.g. "LlamaForCausalLM"
    tokenizer: str  # tokenizer path or repo id (defaults to `path`)
    dtype_name: str  # torch dtype name, e.g. "bfloat16"
    max_model_len: int
    eos_token_ids: tuple[int, ...]  # from generation_config.json, else config.json; may be empty
    load_format: str  # "safetensors", "pt" or "dummy"
    gguf_file: str | None = None  # the source file when the folder was converted from GGUF
    vocab_size: int = 0


class ModelError(msgspec.Struct, array_like=True, tag=True):
    """Sent instead of a ModelDescription: why the model cannot be served ("ValueError: model ... has no
    config.json"), for the API server to print as it is."""
    reason: str


def describe_model(info: ModelDescription) -> ModelDescription:
    """The wire part of a ModelInfo (a ModelDescription subclass): its fields without the parsed config."""
    return ModelDescription(*(getattr(info, f) for f in ModelDescription.__struct_fields__))


# ---- engine core -> workers: one step --------------------------------------------------------------------------
class NewRequestData(msgspec.Struct, array_like=True):
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # Token ids forbidden until the request has sampling_params.min_tokens outputs (EOS and stop ids), resolved
    # by the engine core; empty when min_tokens is 0.
    min_tokens_blocked: list[int] = []


class CachedRequestData(msgspec.Struct, array_like=True):
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class SchedulerOutput(msgspec.Struct, array_like=True):
    """New requests travel in full once; running requests as diffs. A preempted request that resumes travels as a
    new request again (with its output tokens so far), so workers never reconcile stale state."""
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # req_id -> number of tokens computed this step (prefill chunk length, 1 for decode, 1 + k with spec tokens).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # req_id -> speculative tokens to verify this step (already counted in num_scheduled_tokens).
    scheduled_spec_decode_tokens: dict[str, list[int]]
    # Requests finished or preempted since the last step: workers drop their state.
    finished_req_ids: list[str]


class GrammarOutput(msgspec.Struct, array_like=True):
    """The packed grammar bitmask of one step, built by the engine core while the forward runs.

    Row i belongs to req_ids[i] (only constrained requests have rows) and is `num_words` little-endian int32 words:
    bit t of the row allows token t. A request verifying k spec tokens has 1 + k consecutive rows."""
    req_ids: list[str]
    rows_per_req: list[int]
    num_words: int
    bitmask: bytes  # int32 [sum(rows_per_req), num_words], C order (in process: a view valid during the step)
    shared: str = ""  # the rows are in this shared-memory segment instead (bitmask empty; vllm_lite/shared_masks.py)


class ModelRunnerOutput(msgspec.Struct, array_like=True):
    """One step's results, in the order of `req_ids`; requests still in a partial prefill get no token; a request
    that verified k spec tokens gets the accepted ones plus one more (1..k+1)."""
    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    # Per request (None when not asked): per sampled token, [(token_id, logprob, rank)...], sampled token first.
    logprobs: list[list[list[tuple[int, float, int]]] | None]
    # In-worker drafter (draft model, EAGLE): per request, the draft tokens for its next step ([] for none); None
    # when no drafter runs. The scheduler stores them as the request's spec_token_ids.
    draft_token_ids: list[list[int]] | None = None
    # req_id -> its prompt logprobs (EngineCoreOutput.prompt_logprobs), for requests that asked and whose prompt
    # was completed in this step (worker/prompt_logprobs.py); None when there are none.
    prompt_logprobs: dict[str, list[list[tuple[int, float, int]]]] | None = None


# ---- worker RPC (one Struct per call) ---------------------------------------------------------------------------
class DetermineNumBlocks(msgspec.Struct, array_like=True, tag=True):
    """How many KV blocks fit (each rank answers; the executor takes the minimum)."""


class InitializeKVCache(msgspec.Struct, array_like=True, tag=True):
    num_blocks: int


class ExecuteModel(SchedulerOutput, tag=True):
    """Launch a step's forward (no reply)."""


class SampleTokens(msgspec.Struct, array_like=True, tag=True):
    """Sample the step launched last, with its grammar bitmask if any (no reply)."""
    grammar: GrammarOutput | None = None


class Shutdown(msgspec.Struct, array_like=True, tag=True):
    pass


class WorkerReply(msgspec.Struct, array_like=True, tag=True):
    result: Any = None
    error: str | None = None


class StepOutput(ModelRunnerOutput, tag=True):
    """ModelRunnerOutput as it travels on a worker's output socket."""


# ---- codecs -------------------------------------------------------------------------------------------------------
class _TaggedRequest(EngineCoreRequest, tag="EngineCoreRequest"):
    pass


class _TaggedOutputs(EngineCoreOutputs, tag="EngineCoreOutputs"):
    pass


CoreInput = Union[_TaggedRequest, AbortRequests]
CoreEvent = Union[_TaggedOutputs, ModelDescription, ModelError, EngineReady, EngineDead]
WorkerCall = Union[DetermineNumBlocks, InitializeKVCache, ExecuteModel, SampleTokens, Shutdown]
WorkerEvent = Union[StepOutput, ModelDescription, ModelError, WorkerReply]

CORE_INPUT_DECODER = msgspec.msgpack.Decoder(CoreInput)
CORE_EVENT_DECODER = msgspec.msgpack.Decoder(CoreEvent)
WORKER_CALL_DECODER = msgspec.msgpack.Decoder(WorkerCall)
WORKER_EVENT_DECODER = msgspec.msgpack.Decoder(WorkerEvent)
_ENCODER = msgspec.msgpack.Encoder()

_TAGGED: dict[type, type] = {
    EngineCoreRequest: _TaggedRequest, EngineCoreOutputs: _TaggedOutputs, SchedulerOutput: ExecuteModel,
    ModelRunnerOutput: StepOutput,
}


def encode(msg: msgspec.Struct) -> bytes:
    """Encode a message, tagging the plain Structs that travel in a union (their fields are the tagged ones')."""
    tagged = _TAGGED.get(type(msg))
    if tagged is not None:
        msg = tagged(*(getattr(msg, f) for f in msg.__struct_fields__))
    return _ENCODER.encode(msg)
