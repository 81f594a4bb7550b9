"""The model runner's CUDA-graph step paths, emulated on the CPU: uniform decode graphs (padding requests of one
token over block 0) and prefill graphs of 1, 2 and 4 request slots (one-token dummies, then one padding request over
block 0). The runner stages, pads and replays exactly as on CUDA: static input buffers, padded token counts, slot -1
for padding rows. Only two things are stand-ins: a "replay" runs the eager forward over the static buffers, and the
attention backend attends through the CSR page table FlashInfer would be planned with (attention/prefill_graph.py for
prefill graphs). Greedy outputs must equal the plain CPU engine's, token for token (fp32)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from vllm_lite import LLM, SamplingParams
from vllm_lite.attention import StepMetadata, TorchAttentionBackend
from vllm_lite.attention.prefill_graph import prefill_graph_tables
from vllm_lite.compile import CUDAGraphRunner
from vllm_lite.compile.cuda_graphs import PREFILL
from vllm_lite.kernels.kv_cache import write_kv_cache_torch
from vllm_lite.protocol import EngineCoreRequest

ENGINE = dict(device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8, max_prefill_graph_tokens=64,
              prefill_graph_requests=4, enable_prefix_caching=False)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@dataclass
class CSRMeta:
    step: StepMetadata
    size: int  # the graph's padded token count
    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    last_page_len: np.ndarray
    kv_indices: np.ndarray


class CSRBackend(TorchAttentionBackend):
    """The torch backend, plus FlashInfer's graph contract: prepare(meta, graph_batch_size, prefill_slots) builds
    the padded batch's page table; forward writes the rows whose static slot is >= 0 and attends through it."""
    supports_cuda_graphs = True

    def __init__(self, graphs: CUDAGraphRunner) -> None:
        self.graphs = graphs

    def prepare(self, meta: StepMetadata, graph_batch_size: int | None = None, prefill_slots: int = 0):
        if graph_batch_size is None:
            return super().prepare(meta)
        n, bs = meta.num_reqs, meta.block_size
        qsl, seq = meta.query_start_loc_cpu[: n + 1].numpy(), meta.seq_lens_cpu[:n].numpy()
        bt = (meta.block_table_cpu if meta.block_table_cpu is not None else meta.block_table)[:n].numpy()
        if prefill_slots:
            t = prefill_graph_tables(qsl, seq, graph_batch_size, prefill_slots, bs, bt)
            return CSRMeta(meta, graph_batch_size, t.qo_indptr, t.kv_indptr, t.last_page_len, t.kv_indices)
        q = meta.max_query_len  # a uniform step: padding requests of q tokens in block 0 (seq_len q)
        assert meta.num_tokens == n * q and graph_batch_size % q == 0
        pad = graph_batch_size // q - n
        nblk = (seq + bs - 1) // bs
        kv_indptr = np.concatenate([[0], np.cumsum(nblk), nblk.sum() + np.arange(1, pad + 1)])
        last = np.concatenate([seq - (nblk - 1) * bs, np.full(pad, q)])
        indices = np.concatenate([bt[np.arange(bt.shape[1])[None, :] < nblk[:, None]], np.zeros(pad, np.int64)])
        return CSRMeta(meta, graph_batch_size, np.arange(0, graph_batch_size + 1, q), kv_indptr, last, indices)

    def forward(self, q, k, v, kv_cache, spec, meta):
        if not isinstance(meta, CSRMeta):
            return super().forward(q, k, v, kv_cache, spec, meta)
        assert q.shape[0] == meta.size  # the graph's rows: the step's, then padding
        bs = meta.step.block_size
        slots = self.graphs.slot_mapping[: meta.size]
        keep = slots >= 0
        assert int(keep.sum()) == meta.step.num_tokens and bool(keep[: meta.step.num_tokens].all())
        write_kv_cache_torch(k[keep], v[keep], kv_cache, slots[keep], bs)
        out = torch.zeros_like(q)
        group = spec.num_heads // spec.num_kv_heads
        for r in range(len(meta.qo_indptr) - 1):
            pages = torch.from_numpy(np.asarray(meta.kv_indices[meta.kv_indptr[r]: meta.kv_indptr[r + 1]]))
            kv_len = (len(pages) - 1) * bs + int(meta.last_page_len[r])
            keys = kv_cache[pages.long(), 0].reshape(-1, spec.num_kv_heads, spec.head_dim)[:kv_len]
            vals = kv_cache[pages.long(), 1].reshape(-1, spec.num_kv_heads, spec.head_dim)[:kv_len]
            q0, q1 = int(meta.qo_indptr[r]), int(meta.qo_indptr[r + 1])
            rows = q[q0:q1]
            ql = q1 - q0
            seen = torch.arange(kv_len)[None, :] <= (kv_len - ql + torch.arange(ql))[:, None]  # causal, bottom-right
            keys, vals = keys.repeat_interleave(group, dim=1), vals.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", rows.float(), keys.float()) * spec.scale
            scores = scores.masked_fill(~seen[None], float("-inf"))
            out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals.float()).to(q.dtype)
        return out


class Replay:
    """A captured graph stand-in: the eager forward over the runner's static buffers of `size` rows."""

    def __init__(self, graphs: CUDAGraphRunner, forward, key: int, size: int) -> None:
        self.graphs, self.forward, self.key, self.size = graphs, forward, key, size

    def replay(self) -> None:
        g = self.graphs
        g.outputs[self.key, self.size] = self.forward(g.input_ids[: self.size], g.positions[: self.size])


def _with_emulated_graphs(llm: LLM) -> CUDAGraphRunner:
    runner = llm.model_runner()
    shapes = runner.shapes
    graphs = CUDAGraphRunner(runner.forward, shapes.capture_sizes, max(shapes.capture_sizes), "cpu",
                             runner.info.hf_config.hidden_size, runner.info.dtype, index_dtype=torch.int64,
                             query_lens=shapes.graph_query_lens, prefill_sizes=shapes.prefill_sizes,
                             prefill_slots=shapes.prefill_slots)
    for key, sizes in graphs.token_sizes.items():
        for size in sizes:
            graphs.graphs[key, size] = Replay(graphs, runner.forward, key, size)
    runner.graphs = graphs
    runner.attn_ctx.backend = CSRBackend(graphs)
    return graphs


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_graph_steps_match_the_plain_engine(tiny_llama_path):
    rng = np.random.default_rng(0)
    prompt = lambda n: rng.integers(3, 300, n).tolist()  # noqa: E731
    calls = [[prompt(5)], [prompt(20)], [prompt(47)],  # alone: prefill graphs of 16, 32 and 64 tokens
             [prompt(5), prompt(9), prompt(14)],  # 28 tokens of 3 requests + 1 dummy: 4 slots, 32 tokens
             [prompt(7), prompt(11)],  # 2 slots
             [prompt(40), prompt(30)]]  # 70 tokens: no prefill graph, an eager step
    plain = LLM(tiny_llama_path, **ENGINE)
    want = [_tokens(plain, c) for c in calls]
    del plain
    llm = LLM(tiny_llama_path, **ENGINE)
    graphs = _with_emulated_graphs(llm)
    assert sorted(k for k in graphs.token_sizes if k < 0) == [-4, -2, -1]
    got = [_tokens(llm, c) for c in calls]
    assert got == want
    assert graphs.num_replays[PREFILL] == 3 and graphs.num_replays[-4] >= 1 and graphs.num_replays[-2] >= 1
    assert graphs.num_replays[1] > 0  # decode steps replayed (padded) decode graphs


def _staggered(llm: LLM, prompts: list[list[int]], params: SamplingParams, steps_between: int) -> dict[str, list[int]]:
    """Each prompt arrives after `steps_between` engine steps of the ones before (it joins running requests); the
    tokens each request produced."""
    core, tokens = llm.engine, {str(i): [] for i in range(len(prompts))}

    def step() -> None:
        for out in core.step().outputs:
            tokens[out.request_id] += out.new_token_ids

    for i, p in enumerate(prompts):
        core.add_request(EngineCoreRequest(str(i), p, params, time.time()))
        for _ in range(steps_between):
            step()
    while core.has_unfinished_requests():
        step()
    return tokens


@pytest.mark.parametrize("seed", [1, 2])
def test_prompts_joining_running_decodes(tiny_llama_path, seed):
    """Requests arriving while others decode: the steps that mix a prompt with decodes replay prefill graphs of 2 or
    4 request slots; every request's tokens equal the plain engine's."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 300, int(n)).tolist() for n in rng.integers(3, 20, 5)]
    plain = LLM(tiny_llama_path, **ENGINE)
    want = _staggered(plain, prompts, GREEDY, 2)  # two steps before the next arrives: it joins running decodes
    del plain
    llm = LLM(tiny_llama_path, **ENGINE)
    graphs = _with_emulated_graphs(llm)
    assert _staggered(llm, prompts, GREEDY, 2) == want and all(len(t) == GREEDY.max_tokens for t in want.values())
    assert graphs.num_replays[-2] + graphs.num_replays[-4] >= 2


class _Drafts:
    """Drafts from the plain run's continuation: 1 to 4 of them in turn, every third set with a wrong last token (so
    verification rejects some), nothing once a request has left the reference."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]]) -> None:
        self.reference, self.calls = reference, 0

    def propose(self, request, k: int) -> list[int]:
        ref = self.reference.get(tuple(request.prompt_token_ids))
        done = len(request.output_token_ids)
        if ref is None or request.output_token_ids != ref[:done]:
            return []
        self.calls += 1
        drafts = ref[done: done + min(k, 1 + self.calls % 4)]
        if drafts and self.calls % 3 == 0:
            drafts[-1] = (drafts[-1] + 1) % 300
        return drafts


def test_verification_steps_padded_into_graphs(tiny_llama_path):
    """Speculative steps (k = 4) with verification padding on, as on CUDA: a request verifying fewer than k drafts is
    padded to 1 + k tokens and the step replays the 1 + k graph; outputs equal the plain engine's."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 300, int(n)).tolist() for n in (9, 14, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM(tiny_llama_path, **ENGINE)
    want = [list(o.outputs[0].token_ids) for o in plain.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                  use_tqdm=False)]
    del plain
    llm = LLM(tiny_llama_path, **ENGINE, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    llm.engine.proposer = proposer = _Drafts({tuple(p): w for p, w in zip(prompts, want)})
    graphs = _with_emulated_graphs(llm)
    llm.model_runner().pad_verification = True  # what initialize_kv_cache sets once graphs are captured
    for batch in ([prompts[0]], prompts):
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == want[: len(batch)]
    scheduler = llm.engine.scheduler
    assert proposer.calls > 0 and 0 < scheduler.num_accepted_tokens < scheduler.num_draft_tokens
    assert 5 in graphs.token_sizes and graphs.num_replays[5] > 0


def test_chunked_prefill_chunks_replay_prefill_graphs(tiny_llama_path):
    """max_num_batched_tokens=32: a 47-token prompt is prefilled in chunks of 32 and 15 tokens. The first runs eager
    (a 32-token graph holds at most 31 of the step's tokens); the second, after its 32 cached tokens, replays the
    16-token prefill graph."""
    engine = {**ENGINE, "max_num_batched_tokens": 32}
    prompts = [np.random.default_rng(4).integers(3, 300, 47).tolist()]
    plain = LLM(tiny_llama_path, **engine)
    want = _tokens(plain, prompts)
    del plain
    llm = LLM(tiny_llama_path, **engine)
    graphs = _with_emulated_graphs(llm)
    assert graphs.token_sizes[PREFILL] == [16, 32]
    assert _tokens(llm, prompts) == want
    assert graphs.num_replays[PREFILL] == 1


def test_prompt_logprobs_through_a_prefill_graph(tiny_llama_path):
    """The prompt-logprob rows are read from a replayed prefill graph's output: the same values as the plain
    engine's."""
    prompt = np.random.default_rng(5).integers(3, 300, 21).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2, logprobs=1)
    plain = LLM(tiny_llama_path, **ENGINE)
    want = plain.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    del plain
    llm = LLM(tiny_llama_path, **ENGINE)
    graphs = _with_emulated_graphs(llm)
    got = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert graphs.num_replays[PREFILL] == 1
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(prompt)
    for g, w in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert g.keys() == w.keys()
        for tok in g:
            assert abs(g[tok].logprob - w[tok].logprob) < 1e-4


def test_prompts_joining_verifying_requests(tiny_llama_path):
    """Speculation (k = 4) with staggered arrivals: steps that mix a new prompt with requests verifying drafts replay
    prefill graphs of several request slots (verification rows of 1 + j tokens beside the prompt's); every
    request's tokens equal the plain engine's."""
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, 300, int(n)).tolist() for n in rng.integers(3, 20, 5)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = LLM(tiny_llama_path, **ENGINE)
    want = _staggered(plain, prompts, params, 3)
    del plain
    llm = LLM(tiny_llama_path, **ENGINE, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    llm.engine.proposer = proposer = _Drafts({tuple(p): want[str(i)] for i, p in enumerate(prompts)})
    graphs = _with_emulated_graphs(llm)
    llm.model_runner().pad_verification = True
    verify_in_prefill_graphs = []
    runner = llm.model_runner()
    execute = runner.execute_model

    def spying_execute(so):
        before = sum(n for key, n in graphs.num_replays.items() if key < -1)
        execute(so)
        if so.scheduled_spec_decode_tokens and sum(n for key, n in graphs.num_replays.items() if key < -1) > before:
            verify_in_prefill_graphs.append(dict(so.num_scheduled_tokens))

    runner.execute_model = spying_execute
    assert _staggered(llm, prompts, params, 3) == want and all(len(t) == params.max_tokens for t in want.values())
    scheduler = llm.engine.scheduler
    assert proposer.calls > 0 and 0 < scheduler.num_accepted_tokens < scheduler.num_draft_tokens
    assert graphs.num_replays[-2] + graphs.num_replays[-4] >= 2
    assert verify_in_prefill_graphs, "no step mixed a prompt with verifications inside a prefill graph"
