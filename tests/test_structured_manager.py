"""The engine core's grammar manager and a request's Grammar, below the engine (issue 13): termination from known
stop tokens, deferred tokens (recorded, then taken in one batch call, and before any other use of the matcher) and the
step's mask rows in a reused buffer, filled in line or on the fill thread."""
from __future__ import annotations

import pytest

from vllm_lite import SamplingParams, StructuredOutputsParams
from vllm_lite.config import StructuredOutputsConfig
from vllm_lite.structured_output.manager import StructuredOutputManager

from structured_schemas import SCHEMAS
from tiny_models import DEFAULT_VOCAB as SMOL_VOCAB


def _manager(path: str, config: StructuredOutputsConfig | None = None) -> StructuredOutputManager:
    from transformers import AutoTokenizer
    return StructuredOutputManager(config or StructuredOutputsConfig(), lambda: AutoTokenizer.from_pretrained(path),
                                   SMOL_VOCAB, (2,))


def test_a_compiler_built_before_the_constructor_returns_is_kept(tiny_smol_path, monkeypatch):
    """The grammar compiler is built on a pool thread that may finish first (a quick tokenizer, a busy caller): what
    it sets is not reset by the rest of the constructor. Here the pool runs it inline, at once."""
    import concurrent.futures as cf

    import vllm_lite.structured_output.manager as manager_module

    class Inline(cf.ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            future = cf.Future()
            future.set_result(fn(*args, **kwargs))
            return future

    monkeypatch.setattr(manager_module.cf, "ThreadPoolExecutor", Inline)
    manager = _manager(tiny_smol_path)
    assert manager.tokenizer_info is not None and manager._batch is not None and manager._batch_accept is not None
    assert manager.compile_now(StructuredOutputsParams(choice=["yes", "no"])) is not None
    manager.shutdown()


@pytest.mark.parametrize("known_stops", [True, False])
def test_grammar_termination_with_and_without_known_stop_tokens(tiny_smol_path, known_stops):
    """Grammar tracks termination itself when it knows the stop tokens (one call into xgrammar per token instead of
    three): the stop token terminates it, nothing is taken afterwards, a refused token does not terminate it, and a
    draft walk through the stop token leaves it as it was."""
    import xgrammar as xgr

    from vllm_lite.structured_output.grammar import Grammar
    manager = _manager(tiny_smol_path)
    compiled = manager.compile_now(StructuredOutputsParams(choice=["yes", "no"]))
    stops = frozenset(manager.tokenizer_info.stop_token_ids) if known_stops else None
    assert 2 in manager.tokenizer_info.stop_token_ids
    tokenizer = manager.tokenizer_info
    yes = [i for i, t in enumerate(tokenizer.decoded_vocab) if t == b"yes"]
    assert yes
    g = Grammar(xgr.GrammarMatcher(compiled), stops)
    assert g.accept_tokens([5]) == 0 and not g.is_terminated  # refused, still running
    assert g.valid_prefix([yes[0], 2, 7]) == 2 and not g.is_terminated  # the walk is rolled back
    assert g.accept_tokens([yes[0], 2, 7]) == 2 and g.is_terminated  # stops after the stop token
    assert g.accept_tokens([7]) == 0 and g.is_terminated and g.valid_prefix([7]) == 0
    manager.shutdown()


def test_deferred_token_is_taken_before_any_other_use(tiny_smol_path):
    """A single token sampled under the grammar's own mask is only recorded (termination is known at once from the
    stop tokens); the next use of the matcher takes it first, the manager takes many in one call, and after a refused
    one (a mask that was not the grammar's) the grammar takes nothing more, so the scheduler ends the request with an
    error."""
    import xgrammar as xgr

    from vllm_lite.core.scheduler import Scheduler
    from vllm_lite.request import Request, RequestStatus
    from vllm_lite.structured_output.grammar import Grammar
    manager = _manager(tiny_smol_path)
    compiled = manager.compile_now(StructuredOutputsParams(choice=["yes", "no"]))
    stops = frozenset(manager.tokenizer_info.stop_token_ids)
    yes = [i for i, t in enumerate(manager.tokenizer_info.decoded_vocab) if t == b"yes"][0]

    def grammar(sink: list | None) -> Grammar:
        g = Grammar(xgr.GrammarMatcher(compiled), stops, sink)
        g.masked = True  # as if the manager had filled its row for this token
        return g

    sink: list = []
    g = grammar(None)
    assert g.accept_tokens([yes]) == 1 and g.pending == -1  # no sink: taken at once
    g = Grammar(xgr.GrammarMatcher(compiled), stops, sink)
    assert g.accept_tokens([yes]) == 1 and g.pending == -1 and not sink  # not masked: taken at once
    g = grammar(sink)
    assert g.accept_tokens([yes]) == 1 and g.pending == yes and sink == [g] and g.num_accepted == 1
    assert not g.masked and g.valid_prefix([2]) == 1 and g.pending == -1  # flushed, then the walk (rolled back)
    g.masked = True
    assert g.accept_tokens([2]) == 1 and g.is_terminated and not g.matcher.is_terminated()  # known before taken
    g.flush()
    assert g.matcher.is_terminated() and not g.refused
    a, b = grammar(manager._deferred), grammar(manager._deferred)
    a.accept_tokens([yes])
    b.accept_tokens([5])  # refused: "yes" or "no" must come first
    assert not b.is_terminated and len(manager._deferred) == 2
    manager._advance(*manager._take_deferred())
    assert not manager._deferred and a.pending == b.pending == -1
    assert a.matcher.accept_token(2) and not a.refused and b.refused
    b.masked = True
    request = Request("r", [1, 2], SamplingParams())
    request.grammar = b
    taken = b.accept_tokens([yes])
    assert taken == 0 and Scheduler._end_by_grammar(request, [yes], taken) == [] and b.pending == -1  # takes nothing
    assert request.status == RequestStatus.FINISHED_ERROR and "forbids" in request.stop_reason
    manager.shutdown()


@pytest.mark.parametrize("fill_threads", [1, 2])
def test_step_mask_rows_in_a_reused_buffer(tiny_smol_path, fill_threads):
    """The step's mask fills a reused (dirty) buffer: every running grammar's row equals its matcher's own fresh fill
    (also when the fill is deferred to its thread), and the row of a grammar that took its stop token allows
    everything (its token is discarded); the buffer is not cleared first."""
    import numpy as np
    import xgrammar as xgr

    import vllm_lite.structured_output.manager as manager_module
    from vllm_lite.protocol import SchedulerOutput
    from vllm_lite.request import Request
    from vllm_lite.structured_output.grammar import Grammar
    manager = _manager(tiny_smol_path, StructuredOutputsConfig(fill_threads=fill_threads, defer_fill=fill_threads > 1))
    choices = [StructuredOutputsParams(choice=["yes", "no"]), StructuredOutputsParams(regex=r"[0-9]{3}"),
               StructuredOutputsParams(json=SCHEMAS["flat_person"])]
    manager.compiler  # noqa: B018 (waits until it is built: tokenizer_info is set with it)
    stops = frozenset(manager.tokenizer_info.stop_token_ids)
    requests = []
    for i in range(manager_module.BATCH_FILL_MIN_ROWS + 2):  # enough rows for the batch (and deferred) fill
        request = Request(str(i), [1, 2], SamplingParams())
        request.num_computed_tokens = len(request.all_token_ids)
        request.grammar = Grammar(xgr.GrammarMatcher(manager.compile_now(choices[i % 3])), stops, manager._deferred)
        manager.requests[request.request_id] = request
        requests.append(request)
    yes = [i for i, t in enumerate(manager.tokenizer_info.decoded_vocab) if t == b"yes"][0]
    assert requests[0].grammar.accept_tokens([yes]) == 1 and requests[0].grammar.accept_tokens([2]) == 1
    assert requests[0].grammar.is_terminated  # took its stop token
    manager._buffer = np.random.default_rng(0).integers(-2**31, 2**31 - 1, (len(requests), manager.num_words),
                                                        dtype=np.int64).astype(np.int32)
    so = SchedulerOutput([], [], {r.request_id: 1 for r in requests}, len(requests), {}, [])
    out = manager.bitmask(so, defer=True)
    assert hasattr(out, "result") == (fill_threads > 1)  # deferred to its thread
    out = out.result() if fill_threads > 1 else out
    words = np.frombuffer(out.bitmask, dtype=np.int32).reshape(-1, manager.num_words)
    assert out.req_ids == [r.request_id for r in requests] and (words[0] == -1).all()
    for row, request in enumerate(requests[1:], start=1):
        fresh = np.zeros((1, manager.num_words), dtype=np.int32)
        request.grammar.matcher.fill_next_token_bitmask(fresh)
        assert np.array_equal(words[row], fresh[0]), row
    manager.shutdown()


@pytest.mark.parametrize("defer_fill", [False, True])
def test_masks_reach_worker_processes_through_shared_memory(tiny_smol_path, tmp_path, monkeypatch, defer_fill):
    """With worker processes (the server's executor; two replicated ranks here) the engine core fills each step's mask
    into a shared-memory slot and the SampleTokens message only names it: constrained outputs equal the in-process
    engine's, every mask went by name (no slot was still being read when one was needed), and shutdown unlinks the
    segments."""
    import os

    import vllm_lite.structured_output.manager as manager_module
    from vllm_lite.config import EngineConfig
    from vllm_lite.engine.core import EngineCore
    from vllm_lite.executor.multiproc import MultiprocExecutor
    from vllm_lite.model_loader import ModelInfo, resolve_model

    from spec_utils import run_core
    monkeypatch.setattr(manager_module, "BATCH_FILL_MIN_ROWS", 2)  # batch fills (deferred ones with defer_fill)
    kw = dict(model=tiny_smol_path, device="cpu", dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 << 20)
    config = EngineConfig.from_kwargs(**kw)
    so_config = StructuredOutputsConfig(fill_threads=2, defer_fill=defer_fill)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs=StructuredOutputsParams(
        json=SCHEMAS[name], disable_any_whitespace=True)) for s, name in enumerate(["flat_person", "nested_object", "enum_strings"])]
    prompts = [[1, 5, 9 + i, 200 + 7 * i] for i in range(len(params))]
    want = run_core(EngineCore(config, resolve_model(config.model, config.load, "cpu"),
                               grammar=_manager(tiny_smol_path, so_config)), prompts, params)
    executor = MultiprocExecutor(config, str(tmp_path), world_size=2)
    sent = []
    outgoing = executor._mask_slots.outgoing
    executor._mask_slots.outgoing = lambda g, f=outgoing: sent.append(f(g)) or sent[-1]
    try:
        desc, _ = executor.wait_model_description()
        core = EngineCore(config, ModelInfo.from_description(desc), executor, grammar=_manager(tiny_smol_path, so_config))
        got = run_core(core, prompts, params)
        names = {g.shared for g in sent if g is not None}
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
    finally:
        executor.shutdown()
    assert got == want and {r["finish_reason"] for r in got.values()} <= {"stop", "length"}
    masks = [g for g in sent if g is not None]
    assert len(masks) > 10 and all(g.shared and g.bitmask == b"" for g in masks)
    assert names and not any(os.path.exists(f"/dev/shm/{n}") for n in names)
