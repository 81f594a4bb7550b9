"""Tensor parallelism on the CPU (gloo, 2 ranks): sharded layers load the right slices, TP = 2 engines give the
TP = 1 engine's greedy tokens and logprobs (fp32; Llama with biases, Qwen2 with one KV head replicated on both
ranks, Qwen3 with tied embeddings and a vocabulary padded to split), a real `serve -tp 2` answers the openai client
with the offline outputs (and, marked slow, the server test files pass with -tp 2), and the death of rank 1 is an
error within seconds with no process left behind."""
from __future__ import annotations

import subprocess
import sys
import time

import openai
import pytest
import torch

from vllm_lite import LLM, SamplingParams
from vllm_lite.attention import AttentionContext, TorchAttentionBackend
from vllm_lite.config import EngineConfig, LoadConfig, ModelConfig
from vllm_lite.engine.core import EngineCore
from vllm_lite.distributed import TPGroup
from vllm_lite.executor.multiproc import MultiprocExecutor, WorkerDiedError
from vllm_lite.model_loader import ModelInfo, resolve_model
from vllm_lite.model_loader.weights import checkpoint_weights
from vllm_lite.models import check_tensor_parallel, get_model_class

from spec_utils import OracleProposer, WrongProposer, make_core, run_core
from server_utils import REPO_ROOT, RemoteServer, alive, children, cmdline, kill_midstream, serve_tiny_llama, wait_gone
from tiny_models import make_tiny_model, tiny_config

KW = dict(device="cpu", dtype="float32", max_model_len=128, seed=0, block_size=4)
PROMPTS = [[5, 17, 99, 3, 250, 7, 8], [300, 2], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
CASES = {  # name -> make_tiny_model arguments
    "llama-bias": dict(arch="llama", attention_bias=True, mlp_bias=True),
    "qwen2-one-kv-head": dict(arch="qwen2", num_key_value_heads=1),
    "qwen3-tied-padded-vocab": dict(arch="qwen3", tie_word_embeddings=True, vocab_size=387),
}


def _prompts() -> list[dict]:
    return [{"prompt_token_ids": p} for p in PROMPTS]


def _run(llm: LLM) -> list[tuple]:
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5, prompt_logprobs=2)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate(_prompts() + _prompts(), [greedy] * len(PROMPTS) + [seeded] * len(PROMPTS), use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in out]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    args = dict(CASES[request.param])
    path = make_tiny_model(tmp_path_factory.mktemp("tp"), args.pop("arch"), **args)
    want = _run(LLM(path, **KW))
    llm = LLM(path, tensor_parallel_size=2, **KW)
    assert len(llm.engine.executor.procs) == 2
    try:
        yield path, want, _run(llm)
    finally:
        llm.engine.shutdown()


def _close(got: dict, want: dict, tol: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for tok, lp in want.items():
        assert abs(got[tok].logprob - lp.logprob) < tol and got[tok].rank == lp.rank


def test_tp2_matches_tp1(case):
    _, want, got = case
    for (g_ids, g_lps, g_prompt), (w_ids, w_lps, w_prompt) in zip(got, want):
        assert g_ids == w_ids  # greedy rows and seeded sampling alike
        for g, w in zip(g_lps or [], w_lps or []):
            _close(g, w)
        for g, w in zip(g_prompt or [], w_prompt or []):
            assert (g is None) == (w is None)
            if w is not None:
                _close(g, w)
    assert got[0][1] and got[0][2], "greedy rows carry logprobs and prompt logprobs"


def test_speculation_with_tp2(tmp_path):
    """Engine-core drafts verified on two ranks (rejection sampling on identical gathered logits): drafts of the
    reference are all accepted, wrong ones all rejected, and the greedy tokens stay the TP = 1 ones. Drafter models
    in the worker are refused."""
    path = make_tiny_model(tmp_path, "llama", with_tokenizer=False)
    kw = dict(KW, skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2)
    want = run_core(make_core(path, **kw), PROMPTS, params)
    ref = {r: v["tokens"] for r, v in want.items()}
    for proposer, accepted in ((OracleProposer(ref), True), (WrongProposer(ref, 384), False)):
        config = EngineConfig.from_kwargs(model=path, tensor_parallel_size=2, num_speculative_tokens=3, **kw)
        executor = MultiprocExecutor(config, str(tmp_path))
        try:
            desc, _ = executor.wait_model_description()
            core = EngineCore(config, ModelInfo.from_description(desc), executor, proposer=proposer)
            got = run_core(core, PROMPTS, params)
        finally:
            executor.shutdown()
        assert {r: v["tokens"] for r, v in got.items()} == ref
        for r in ref:  # per token: (token id, logprob, rank) of the sampled one, then the top 2
            for g, w in zip(got[r]["logprobs"], want[r]["logprobs"]):
                assert [(t, k) for t, _, k in g] == [(t, k) for t, _, k in w]
                assert all(abs(a[1] - b[1]) < 1e-4 for a, b in zip(g, w))
        stats = core.scheduler.make_stats()
        assert stats.num_draft_tokens > 0
        assert stats.num_accepted_tokens == (stats.num_draft_tokens if accepted else 0)
    with pytest.raises(ValueError, match="draft_model.*tensor_parallel_size > 1"):
        LLM(path, tensor_parallel_size=2, speculative_config={"method": "draft_model", "model": path,
                                                              "num_speculative_tokens": 2}, **kw)


def _shard_model(path: str, rank: int, world_size: int):
    info = resolve_model(ModelConfig(path), LoadConfig(), "cpu")
    ctx = AttentionContext(TorchAttentionBackend())
    model = get_model_class(info.architecture)(info.hf_config, ctx, tp=TPGroup(rank, world_size, ""))
    model.load_weights(checkpoint_weights(info.path))
    return model


def test_shards_hold_their_slices(tmp_path):
    """Without processes: rank r of 2 holds its heads, its replicated KV head, its MLP columns and o/down input
    rows, and its padded vocabulary range; the whole checkpoint is covered."""
    path = make_tiny_model(tmp_path, "qwen2", with_tokenizer=False, num_key_value_heads=1, vocab_size=387)
    full = dict(checkpoint_weights(path))
    for rank in range(2):
        model = _shard_model(path, rank, 2)
        layer = model.model.layers[0]
        qkv = layer.self_attn.qkv_proj.weight
        q = full["model.layers.0.self_attn.q_proj.weight"]
        assert torch.equal(qkv[:32], q[32 * rank: 32 * (rank + 1)])  # 2 of 4 query heads of 16
        assert torch.equal(qkv[32:48], full["model.layers.0.self_attn.k_proj.weight"])  # the one KV head, on both
        assert torch.equal(qkv[48:], full["model.layers.0.self_attn.v_proj.weight"])
        assert torch.equal(layer.self_attn.qkv_proj.bias[:32],
                           full["model.layers.0.self_attn.q_proj.bias"][32 * rank: 32 * (rank + 1)])
        o = full["model.layers.0.self_attn.o_proj.weight"]
        assert torch.equal(layer.self_attn.o_proj.weight, o[:, 32 * rank: 32 * (rank + 1)])
        gate_up = layer.mlp.gate_up_proj.weight
        assert torch.equal(gate_up[:64], full["model.layers.0.mlp.gate_proj.weight"][64 * rank: 64 * (rank + 1)])
        assert torch.equal(gate_up[64:], full["model.layers.0.mlp.up_proj.weight"][64 * rank: 64 * (rank + 1)])
        down = full["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(layer.mlp.down_proj.weight, down[:, 64 * rank: 64 * (rank + 1)])
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        assert emb.shape == head.shape == (194, 64)  # 387 padded to 388, 194 rows each
        rows = 194 if rank == 0 else 193
        assert torch.equal(emb[:rows], full["model.embed_tokens.weight"][194 * rank: 194 * rank + rows])
        assert torch.equal(head[:rows], full["lm_head.weight"][194 * rank: 194 * rank + rows])
        assert not emb[rows:].any() and not head[rows:].any()
        assert (layer.self_attn.num_heads, layer.self_attn.num_kv_heads) == (2, 1)


def test_collectives_are_opaque_ops_under_compile():
    """Dynamo compiles a row-parallel projection and the logits gather in one graph (no break, no tracing into
    torch.distributed), and the compiled results equal eager ones. One gloo rank: the all-reduce sums one part."""
    import torch.distributed as dist
    from vllm_lite.distributed import pick_init_method, tensor_model_parallel_all_gather
    from vllm_lite.layers.linear import RowParallelLinear

    dist.init_process_group("gloo", init_method=pick_init_method(None), rank=0, world_size=1)
    try:
        torch.set_grad_enabled(False)
        name = dist.group.WORLD.group_name
        row = RowParallelLinear(64, 32, bias=True, tp=TPGroup(0, 2, name))  # rank 0's half of 64 inputs
        x = torch.randn(5, 32)
        eager = row(x)
        assert torch.allclose(eager, torch.nn.functional.linear(x, row.weight, row.bias))
        torch._dynamo.reset()
        assert torch.allclose(torch.compile(row, fullgraph=True, dynamic=True)(x), eager, atol=1e-6)
        gather = torch.compile(lambda t: tensor_model_parallel_all_gather(t, 1, name) * 2, fullgraph=True)
        assert torch.equal(gather(x), x * 2)
    finally:
        torch.set_grad_enabled(True)
        dist.destroy_process_group()


def test_what_does_not_split_is_refused(tmp_path):
    check_tensor_parallel(tiny_config("llama"), 2)
    check_tensor_parallel(tiny_config("llama", num_key_value_heads=1), 4)  # one KV head replicated on 4 ranks
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(8"):
        check_tensor_parallel(tiny_config("llama"), 8)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) is not divisible"):
        check_tensor_parallel(tiny_config("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3), 2)
    with pytest.raises(ValueError, match=r"intermediate_size \(130\)"):
        check_tensor_parallel(tiny_config("llama", intermediate_size=130), 4)
    path = make_tiny_model(tmp_path, "llama", with_tokenizer=False, num_attention_heads=2, num_key_value_heads=2,
                           hidden_size=64)
    with pytest.raises(ValueError, match="num_attention_heads"):  # the workers refuse it as they boot
        LLM(path, tensor_parallel_size=4, skip_tokenizer_init=True, **KW)


def test_death_of_rank_1_is_an_error(tmp_path):
    path = make_tiny_model(tmp_path, "llama", with_tokenizer=False)
    llm = LLM(path, tensor_parallel_size=2, skip_tokenizer_init=True, **KW)
    procs = llm.engine.executor.procs
    try:
        procs[1].kill()
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="worker process 1"):
            llm.generate(_prompts(), SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.engine.shutdown()
    assert not any(p.is_alive() for p in procs)


# ---- the server ------------------------------------------------------------------------------------------------
SERVER_ARGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "1024", "--seed", "0",
               "--tensor-parallel-size", "2"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    yield from serve_tiny_llama(tmp_path_factory, "tp-server", SERVER_ARGS)


def _workers(srv: RemoteServer) -> list[int]:
    core = srv.engine_core_pid()
    return sorted(c for c in children(core) if "resource_tracker" not in cmdline(c))


def test_server_tp2_matches_offline(served):
    path, srv = served
    workers = _workers(srv)
    assert len(workers) == 2
    for pid in workers:  # NVLink multicast is off in every rank's environment
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        assert env[b"NCCL_NVLS_ENABLE"] == b"0" and env[b"TORCH_SYMM_MEM_DISABLE_MULTICAST"] == b"1"
        assert env[b"NVSHMEM_DISABLE_NVLS"] == b"1"
    client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="EMPTY", max_retries=0)
    prompts = ["Hello world", "What is the capital of France?"]
    want = LLM(path, device="cpu", dtype="float32", max_model_len=128, seed=0).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2), use_tqdm=False)
    for prompt, ref in zip(prompts, want):
        r = client.completions.create(model=path, prompt=prompt, max_tokens=10, temperature=0.0, logprobs=2,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref.outputs[0].text
        ref_lps = [step[tok].logprob for step, tok in zip(ref.outputs[0].logprobs, ref.outputs[0].token_ids)]
        assert r.choices[0].logprobs.token_logprobs == pytest.approx(ref_lps, abs=1e-4)
    stream = client.chat.completions.create(model=path, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True, n=2, seed=3, temperature=1.0)
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content) > 0


def test_server_rank_1_death_fails_requests_and_exits(served):
    path, srv = served
    tree = srv.tree()
    rank1 = _workers(srv)[1]
    client = openai.OpenAI(base_url=srv.url_for("v1"), api_key="EMPTY", max_retries=0, timeout=30)
    it = iter(client.completions.create(model=path, prompt="Hello", max_tokens=1000, stream=True,
                                        extra_body={"ignore_eos": True}))  # cannot finish before the kill
    next(it)
    assert kill_midstream(srv, rank1, [it]).status_code == 503
    assert srv.proc.wait(30) != 0
    assert not alive(rank1)
    assert wait_gone(tree, 15) == [], "processes left behind after rank 1 died"


@pytest.mark.slow
def test_server_suites_pass_with_tp2():
    """The existing server tests, every server they start given --tensor-parallel-size 2 (conftest's --server-args):
    about 100 s for test_server.py alone on 2 cores, so not in the default run."""
    suites = ["tests/test_server.py", "tests/test_server_hostile.py", "tests/test_tools.py"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites,
                        "--server-args=--tensor-parallel-size 2"], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:]
    assert " passed" in r.stdout.splitlines()[-1] and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-500:]
