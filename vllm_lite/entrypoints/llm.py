"""The offline API, mirroring vLLM: `LLM(model=...).generate(prompts, sampling_params)` and `.chat(messages)`."""
from __future__ import annotations

import gc
import itertools
import logging
import shutil
import sys
import tempfile
import time
import weakref
from typing import Any, Sequence

import torch

from vllm_lite.config import EngineConfig, offline_batch_defaults
from vllm_lite.engine.core import EngineCore
from vllm_lite.engine.output_processor import OutputProcessor
from vllm_lite.executor import Executor
from vllm_lite.executor.multiproc import MultiprocExecutor
from vllm_lite.gc_utils import freeze_startup_heap
from vllm_lite.inputs import validate_prompt
from vllm_lite.model_loader import resolve_model
from vllm_lite.model_loader.loader import rank_weight_bytes
from vllm_lite.outputs import RequestOutput
from vllm_lite.protocol import ModelError
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.structured_output.manager import make_manager
from vllm_lite.structured_output.validate import validate_structured_outputs
from vllm_lite.tokenizer import apply_chat_template, load_tokenizer

logger = logging.getLogger("vllm_lite.llm")

PromptType = str | dict[str, Any]


class LLM:
    """An engine in this process: same engine core and scheduler as the server, no sockets. With
    tensor_parallel_size > 1 the ranks are worker processes (the server's multiprocess executor), ended with
    the LLM."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        given = {k: v for k, v in kwargs.items() if v is not None}
        self.config = EngineConfig.from_kwargs(model=model, **{**offline_batch_defaults(given.get("device", "auto")),
                                                               **given})
        if self.config.parallel.data_parallel_size > 1:
            raise ValueError("LLM(data_parallel_size > 1) is not supported offline: data-parallel replicas run "
                             "behind the server (`vllm-lite serve MODEL --data-parallel-size N`), or run one LLM "
                             "per device")
        self.info = resolve_model(self.config.model, self.config.load, self.config.device.resolved_device())
        self.tokenizer = None if self.config.model.skip_tokenizer_init else load_tokenizer(self.info)
        tokenizer = self.tokenizer
        self.engine = EngineCore(self.config, self.info, self._make_executor(), grammar=make_manager(
            self.config, self.info, None if tokenizer is None else lambda: tokenizer))
        self.processor = OutputProcessor(self.tokenizer)
        self._counter = itertools.count()
        # The engine's heap is static from here on; once this LLM is dropped its cycles (CUDA graphs, the compiled
        # model) must be collectable again, so the freeze ends with it.
        freeze_startup_heap()
        weakref.finalize(self, gc.unfreeze)

    def _make_executor(self) -> Executor | None:
        """None (the engine's in-process executor) for one rank; worker processes for tensor parallelism (a model
        that does not split is refused by the workers' boot check, raised here as a ValueError)."""
        if self.config.parallel.world_size == 1:
            return None
        sock_dir = tempfile.mkdtemp(prefix="vllm-lite-llm-")
        executor = MultiprocExecutor(self.config, sock_dir)
        weakref.finalize(self, _shutdown_workers, executor, sock_dir)
        try:
            desc, _ = executor.wait_model_description()
            if isinstance(desc, ModelError):
                raise ValueError(desc.reason)
        except BaseException:
            _shutdown_workers(executor, sock_dir)
            raise
        return executor

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    @property
    def device(self) -> torch.device:
        """Where the model runs (rank 0's device with tensor parallelism: cuda:0 or cpu)."""
        runner = getattr(self.engine.executor, "runner", None)
        if runner is not None:
            return runner.device
        return torch.device("cuda:0" if self.config.device.resolved_device() == "cuda" else "cpu")

    def weight_bytes(self) -> int:
        """Bytes of one rank's parameters on its device (the weights a decode step reads once per rank)."""
        runner = getattr(self.engine.executor, "runner", None)
        if runner is not None:
            return sum(p.numel() * p.element_size() for p in runner.model.parameters())
        return rank_weight_bytes(self.info, self.config.parallel.tensor_parallel_size)

    def model_runner(self) -> Any:
        """The in-process model runner (rank 0): for diagnostics (bench/tools, bench/profile_decode.py) that time or
        patch its internals (`model`, `forward`, `graphs`, `attn_ctx`, ...); not a stable API. Tensor-parallel
        engines have none here (their ranks are processes): AttributeError."""
        return self.engine.executor.runner

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache, as vLLM's LLM.reset_prefix_cache (True when it was reset)."""
        return self.engine.reset_prefix_cache()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        encoded = [self._encode(p) for p in prompts]
        for _, ids in encoded:
            validate_prompt(ids, self.info.max_model_len, self.info.vocab_size)
        for p in params:  # the server's checks too (SamplingParams alone does not know the tokenizer and vocabulary)
            p.resolve_bad_words(self.tokenizer)
            p.check_vocab(self.info.vocab_size)
            if p.structured_outputs is not None:
                validate_structured_outputs(p.structured_outputs)
        request_ids = []
        for (text, ids), p in zip(encoded, params):
            request_id = str(next(self._counter))
            request_ids.append(request_id)
            for req in self.processor.add_request(request_id, text, ids, p):
                self.engine.add_request(req)
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer; this LLM was built with skip_tokenizer_init=True")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": apply_chat_template(self.tokenizer, conv, chat_template,
                                                            add_generation_prompt),
                    "prompt": None} for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass {'prompt_token_ids': [...]} instead")
        return prompt, self.tokenizer(prompt).input_ids

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        total = len(request_ids)
        start = last = time.perf_counter()
        generated = 0
        while len(results) < total:
            outputs = self.engine.step()
            changed, to_abort = self.processor.process_outputs(outputs.outputs)
            if to_abort:
                self.engine.abort_requests(to_abort)
            generated += sum(len(o.new_token_ids) for o in outputs.outputs)
            for state in changed:
                if state.finished:
                    results[state.request_id] = state.to_output()
            if not outputs.outputs and not self.engine.has_unfinished_requests():
                break
            now = time.perf_counter()
            if use_tqdm and (now - last > 1.0 or len(results) == total):
                last = now
                sys.stderr.write(f"\rProcessed prompts: {len(results)}/{total} "
                                 f"({generated / (now - start):.1f} output tok/s)")
                sys.stderr.flush()
        if use_tqdm:
            sys.stderr.write("\n")
        # Async scheduling may leave a step in flight for requests that already finished: apply it now, so the
        # engine is idle (and any change of its settings takes full effect) when generate returns.
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return [results[r] for r in request_ids if r in results]


def _shutdown_workers(executor: MultiprocExecutor, sock_dir: str) -> None:
    executor.shutdown()
    shutil.rmtree(sock_dir, ignore_errors=True)
