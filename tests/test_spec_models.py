"""Model-based speculative decoding in the worker (draft_model, eagle, eagle3), CPU, float32, tiny random models.

Greedy output with any drafter is token-identical to the plain run: the target verifies every draft. A draft model
equal to the target drafts exactly the target's tokens (all accepted); a perturbed copy agrees often but not always
(partial acceptance, rejections and KV catch-up all exercised); EAGLE and EAGLE-3 heads with random weights in the
public checkpoint layouts load and run. Sampled drafts carry their probabilities to the rejection sampler; seeded
requests are reproducible.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_lite.sampling_params import SamplingParams

from spec_utils import make_core, record_drafts, run_core

BASE = dict(device="cpu", dtype="float32", block_size=4, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(n: int = 5, vocab: int = 384) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def _perturbed_copy(src: str, dst: str, scale: float, seed: int = 0) -> str:
    """The model at `src` with Gaussian noise (scale x each tensor's std) on its weights: a draft model that
    agrees with the target most of the time."""
    shutil.copytree(src, dst)
    weights = load_file(os.path.join(src, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * v.float().std() * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v
             for k, v in weights.items()}
    save_file(noisy, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def _speculate(target: str, draft: str, method: str = "draft_model", k: int = 3, **kw):
    return make_core(target, speculative_config={"method": method, "model": draft, "num_speculative_tokens": k},
                     **{**BASE, **kw})


@pytest.fixture(scope="module")
def plain(tiny_llama_path):
    prompts = _prompts()
    return prompts, run_core(make_core(tiny_llama_path, **BASE), prompts, GREEDY)


@pytest.fixture(scope="module")
def noisy_draft(tiny_llama_path, tmp_path_factory):
    return _perturbed_copy(tiny_llama_path, str(tmp_path_factory.mktemp("draft") / "noisy"), scale=0.03)


def _tokens(results: dict) -> dict:
    return {r: v["tokens"] for r, v in results.items()}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_target_as_its_own_draft_accepts_everything(tiny_llama_path, plain, async_scheduling):
    prompts, ref = plain
    core = _speculate(tiny_llama_path, tiny_llama_path, async_scheduling=async_scheduling)
    got = run_core(core, prompts, GREEDY)
    assert _tokens(got) == _tokens(ref)
    stats = core.scheduler.make_stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    assert core.executor.runner._launches < sum(len(v["tokens"]) for v in ref.values())


def test_no_drafts_above_the_batch_limit(tiny_llama_path, plain):
    """Over disable_by_batch_size running requests the drafter only keeps its KV cache up to date."""
    prompts, ref = plain
    core = make_core(tiny_llama_path, speculative_config={"method": "draft_model", "model": tiny_llama_path,
                                                          "num_speculative_tokens": 3, "disable_by_batch_size": 2},
                     **BASE)
    assert _tokens(run_core(core, prompts, GREEDY)) == _tokens(ref)
    assert core.scheduler.make_stats().num_draft_tokens == 0
    assert core.executor.runner.drafting.drafter.num_proposals == 0


@pytest.mark.parametrize("k", [1, 4])
def test_draft_model_greedy_identical_with_partial_acceptance(tiny_llama_path, noisy_draft, plain, k):
    prompts, ref = plain
    core = _speculate(tiny_llama_path, noisy_draft, k=k)
    assert _tokens(run_core(core, prompts, GREEDY)) == _tokens(ref)
    stats = core.scheduler.make_stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_draft_model_with_chunked_prefill_and_stops(tiny_llama_path, noisy_draft):
    """Prefill chunks (the draft KV follows them), max_tokens 1..30, min_tokens, a stop id, prefix reuse."""
    prompts = _prompts(6)
    prompts[5] = prompts[4] + prompts[5]  # shares a prefix with prompt 4
    params = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=min(n, 3), stop_token_ids=[7])
              for n in (1, 2, 5, 9, 17, 30)]
    kw = dict(max_num_batched_tokens=24)
    ref = run_core(make_core(tiny_llama_path, **BASE, **kw), prompts, params)
    got = run_core(_speculate(tiny_llama_path, noisy_draft, k=3, **kw), prompts, params)
    assert got == ref


# ---- EAGLE heads with random weights in the public checkpoint layouts --------------------------------------------
def _head_config(path: str, hidden: int, **extra) -> None:
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
               intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=384,
               max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
               tie_word_embeddings=False, torch_dtype="float32")
    cfg.update(extra)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


def _layer_weights(prefix: str, gen: torch.Generator, h: int, qkv_in: int) -> dict[str, torch.Tensor]:
    """One Llama decoder layer (4 query / 2 KV heads), HF names; std 0.2 * sqrt(64 / fan-in)."""
    def rnd(rows, cols):
        return 0.2 * (64 / cols) ** 0.5 * torch.randn(rows, cols, generator=gen)
    attn = f"{prefix}.self_attn"
    return {f"{attn}.q_proj.weight": rnd(h, qkv_in), f"{attn}.k_proj.weight": rnd(h // 2, qkv_in),
            f"{attn}.v_proj.weight": rnd(h // 2, qkv_in), f"{attn}.o_proj.weight": rnd(h, h),
            f"{prefix}.mlp.gate_proj.weight": rnd(2 * h, h), f"{prefix}.mlp.up_proj.weight": rnd(2 * h, h),
            f"{prefix}.mlp.down_proj.weight": rnd(h, 2 * h),
            f"{prefix}.post_attention_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=gen)}


def make_eagle1_head(path: str, hidden: int = 64, seed: int = 0) -> str:
    """EAGLE (EAGLE-LLaMA3-Instruct layout): fc [H, 2H], layers.0.* without input_layernorm, no embed_tokens."""
    gen = torch.Generator().manual_seed(seed)
    _head_config(path, hidden)
    w = {"fc.weight": 0.2 * torch.randn(hidden, 2 * hidden, generator=gen),
         **_layer_weights("layers.0", gen, hidden, hidden)}
    save_file(w, os.path.join(path, "model.safetensors"))
    return path


def make_eagle3_head(path: str, aux_layers: list[int], hidden: int = 64, draft_vocab: int = 200,
                     seed: int = 0) -> str:
    """EAGLE-3 (EAGLE3-LLaMA3.1-Instruct layout): fc [H, 3H], midlayer.* (q/k/v over 2H, hidden_norm), norm,
    lm_head [draft_vocab, H], d2t / t2d; no embed_tokens."""
    gen = torch.Generator().manual_seed(seed)
    _head_config(path, hidden, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab,
                 target_hidden_size=hidden, eagle_config={"eagle_aux_hidden_state_layer_ids": aux_layers})
    targets = torch.sort(torch.randperm(384, generator=gen)[:draft_vocab]).values
    t2d = torch.zeros(384, dtype=torch.bool)
    t2d[targets] = True
    h = hidden
    w = {"fc.weight": 0.2 * torch.randn(h, 3 * h, generator=gen), **_layer_weights("midlayer", gen, h, 2 * h),
         "midlayer.input_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
         "midlayer.hidden_norm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
         "norm.weight": 1 + 0.1 * torch.randn(h, generator=gen),
         "lm_head.weight": 0.2 * torch.randn(draft_vocab, h, generator=gen),
         "d2t": targets - torch.arange(draft_vocab), "t2d": t2d}
    save_file(w, os.path.join(path, "model.safetensors"))
    return path


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_eagle_head_greedy_identical(tiny_llama_path, plain, tmp_path, async_scheduling):
    prompts, ref = plain
    head = make_eagle1_head(str(tmp_path / "eagle"))
    core = _speculate(tiny_llama_path, head, method="eagle", async_scheduling=async_scheduling)
    assert _tokens(run_core(core, prompts, GREEDY)) == _tokens(ref)
    assert core.scheduler.make_stats().num_draft_tokens > 0


@pytest.mark.parametrize("k", [1, 3])
def test_eagle3_head_greedy_identical(tiny_llama_path, plain, tmp_path, k):
    prompts, ref = plain
    head = make_eagle3_head(str(tmp_path / "eagle3"), aux_layers=[0, 1, 1])
    core = _speculate(tiny_llama_path, head, method="eagle3", k=k)
    assert _tokens(run_core(core, prompts, GREEDY)) == _tokens(ref)
    stats = core.scheduler.make_stats()
    assert stats.num_draft_tokens > 0
    drafter = core.executor.runner.drafting.drafter
    assert drafter.aux_hidden_layers == (0, 1) and drafter.draft_to_target is not None


def _dense_forward(model: torch.nn.Module, ctx, ids: list[int], num_layers: int, kv_heads: int, head_dim: int):
    """model(ids at positions 0..n-1) as one prefill into a scratch KV cache (the context's own is kept)."""
    from tiny_models import make_step_metadata
    meta, num_blocks = make_step_metadata([len(ids)], block_size=4)
    saved = ctx.kv_caches, ctx.metadata
    shape = ctx.backend.kv_cache_shape(num_blocks, 4, kv_heads, head_dim)
    ctx.kv_caches = [torch.zeros(shape) for _ in range(num_layers)]
    ctx.set_step(meta)
    try:
        return model(torch.tensor(ids), torch.arange(len(ids)))
    finally:
        ctx.kv_caches, ctx.metadata = saved


def _reference_drafts(runner, tokens: list[int], k: int) -> list[int]:
    """The drafter's k greedy drafts after `tokens`, computed from scratch: dense forwards of the whole sequence
    (the target for its hidden states, then the drafter over every row), extended by one draft at a time."""
    drafter = runner.drafting.drafter
    target_cfg = runner.info.hf_config
    drafts: list[int] = []
    if drafter.token_shift == 0:  # draft model: its own greedy continuation
        seq = list(tokens)
        for _ in range(k):
            hidden = _dense_forward(drafter.model, drafter.ctx, seq, drafter.num_layers, drafter.num_kv_heads,
                                    drafter.head_dim)
            seq.append(int(drafter._logits(hidden[-1:]).argmax()))
        return seq[len(tokens):]
    out = _dense_forward(runner.model, runner.attn_ctx, tokens[:-1], target_cfg.num_hidden_layers,
                         runner.num_kv_heads, runner.head_dim)
    if drafter.eagle3:
        aux = out[1]
        hidden = drafter.model.fc(torch.cat([aux[i] for i in drafter._aux_order], dim=-1))
    else:
        hidden = out
    ids = list(tokens[1:])
    for _ in range(k):
        drafter.model.hidden_in[: len(ids)] = hidden
        normed, (prenorm,) = _dense_forward(drafter.model, drafter.ctx, ids, drafter.num_layers,
                                            drafter.num_kv_heads, drafter.head_dim)
        draft = int(drafter._logits(normed[-1:]).argmax())
        drafts.append(draft)
        ids.append(draft)
        hidden = torch.cat([hidden, prenorm[-1:]])
    return drafts


@pytest.mark.parametrize("method", ["draft_model", "eagle", "eagle3"])
def test_drafts_equal_a_from_scratch_computation(tiny_llama_path, noisy_draft, tmp_path, method):
    """The drafts of every step (catch-up of accepted tokens into the drafter's KV cache, k - 1 decode steps) equal
    the drafter run from scratch over the whole sequence."""
    model = {"draft_model": lambda: noisy_draft, "eagle": lambda: make_eagle1_head(str(tmp_path / "e1")),
             "eagle3": lambda: make_eagle3_head(str(tmp_path / "e3"), aux_layers=[1, 0, 1])}[method]()
    core = _speculate(tiny_llama_path, model, method=method, k=3, max_num_batched_tokens=16)
    seen = record_drafts(core)
    run_core(core, _prompts(3), SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    assert len(seen) >= 6
    runner = core.executor.runner
    for tokens, drafts in seen[::2][:8]:
        assert drafts == _reference_drafts(runner, tokens, 3)


def test_sampled_drafts_carry_their_probabilities(tiny_llama_path, noisy_draft):
    """Random requests draft by sampling and hand the draft distribution q to the rejection sampler: the target
    drafting for itself (q = p) has every draft accepted; seeded requests repeat exactly."""
    prompts = _prompts(3)
    params = [SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=s) for s in (1, 2, 3)]
    core = _speculate(tiny_llama_path, tiny_llama_path, k=3)
    run_core(core, prompts, params)
    stats = core.scheduler.make_stats()
    assert stats.num_draft_tokens > 10 and stats.num_accepted_tokens >= stats.num_draft_tokens - 1
    first = run_core(_speculate(tiny_llama_path, noisy_draft, k=3), prompts, params)
    core = _speculate(tiny_llama_path, noisy_draft, k=3)
    assert run_core(core, prompts, params) == first
    stats = core.scheduler.make_stats()
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_drafts_travel_from_a_worker_process(tiny_llama_path, plain, tmp_path):
    """The server's layout: the drafter runs in a worker process; its drafts reach the engine core on the socket."""
    from vllm_lite.config import EngineConfig
    from vllm_lite.engine.core import EngineCore
    from vllm_lite.executor.multiproc import MultiprocExecutor
    from vllm_lite.model_loader import ModelInfo
    prompts, ref = plain
    config = EngineConfig.from_kwargs(model=tiny_llama_path, speculative_config={
        "method": "draft_model", "model": tiny_llama_path, "num_speculative_tokens": 3}, **BASE)
    executor = MultiprocExecutor(config, str(tmp_path), world_size=1)
    try:
        desc, _ = executor.wait_model_description()
        core = EngineCore(config, ModelInfo.from_description(desc), executor)
        got = run_core(core, prompts, GREEDY)
    finally:
        executor.shutdown()
    assert _tokens(got) == _tokens(ref)
    stats = core.scheduler.make_stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("method", ["draft_model", "eagle3"])
def test_matrix_preemption_prefix_cache_penalties_logprobs_grammar(tiny_llama_path, noisy_draft, tmp_path, method,
                                                                  ahead):
    """A KV cache too small for the batch (preemption by recompute, the drafter's KV recomputed too), chunked
    prefills, prompts sharing a prefix, penalties, logprobs, min_tokens + a stop id and a grammar mask on one
    request: tokens equal the plain run's under the same settings, logprobs within 1e-4. ahead: the engine launches
    the next step as soon as a step is applied with nothing in flight (EngineCore.launch_ahead, CUDA's default)."""
    from spec_utils import AllowOnly
    shared = _prompts(1)[0] * 2
    prompts = [shared + p for p in _prompts(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3,
                             presence_penalty=0.4),
              SamplingParams(temperature=0.0, max_tokens=20, min_tokens=6, stop_token_ids=[9, 17]),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, frequency_penalty=0.5, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)]
    kw = dict(BASE, max_model_len=128, num_gpu_blocks_override=40, max_num_batched_tokens=32)
    allowed = set(range(40, 120))
    ref = run_core(make_core(tiny_llama_path, grammar=AllowOnly(allowed, 384, {"4"}), **kw), prompts, params)
    model = noisy_draft if method == "draft_model" else make_eagle3_head(str(tmp_path / "e3"), aux_layers=[0, 1, 1])
    core = make_core(tiny_llama_path, grammar=AllowOnly(allowed, 384, {"4"}), speculative_config={
        "method": method, "model": model, "num_speculative_tokens": 3}, **kw)
    core.launch_ahead = ahead
    got = run_core(core, prompts, params)
    assert _tokens(got) == _tokens(ref) and set(got["4"]["tokens"]) <= allowed
    for r in ref:
        assert got[r]["finish_reason"] == ref[r]["finish_reason"]
        for mine, theirs in zip(got[r]["logprobs"], ref[r]["logprobs"], strict=True):
            assert [t for t, _, _ in mine] == [t for t, _, _ in theirs]
            assert [lp for _, lp, _ in mine] == pytest.approx([lp for _, lp, _ in theirs], abs=1e-4)
    stats = core.scheduler.make_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0 and stats.num_draft_tokens > 0, stats
    if method == "draft_model":
        assert stats.num_accepted_tokens > 0


def test_offline_llm_n_and_stop_strings(tiny_llama_path):
    """LLM(speculative_config=draft_model): n = 2 and a stop string give the plain LLM's texts, finish and stop
    reasons; accepted counts per request."""
    from vllm_lite import LLM
    kw = dict(device="cpu", dtype="float32", max_model_len=256)
    plain = LLM(tiny_llama_path, **kw)
    spec = LLM(tiny_llama_path, speculative_config={"method": "draft_model", "model": tiny_llama_path,
                                                    "num_speculative_tokens": 3}, **kw)
    prompts = [{"prompt_token_ids": p} for p in _prompts(3)]
    text = plain.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    params = SamplingParams(temperature=0.0, max_tokens=24, n=2, stop=[stop])
    want = plain.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    assert want[0].outputs[0].finish_reason == "stop"
    for w, g in zip(want, got, strict=True):
        assert [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in g.outputs] == \
            [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in w.outputs]
    assert all(g.num_accepted_tokens > 0 and g.num_accepted_tokens == g.num_draft_tokens for g in got)


def test_spec_trace_times_worker_drafting(tiny_llama_path, tmp_path):
    """bench/tools/spec_trace.py on an EAGLE-3 head (issue 17's "where the step time goes"): verification steps
    carry the worker's drafting time and, within it, the wait for the verified tokens."""
    import json
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench", "tools"))
    import spec_trace
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "test.jsonl").write_text("\n".join(json.dumps({"question": q, "answer": "#### 1"}) for q in (
        "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "A train travels 60 miles in 2 hours. What is its speed?")))
    head = make_eagle3_head(str(tmp_path / "e3"), aux_layers=[0, 1, 1])
    r = spec_trace.main(["--workload", "gsm8k", "--spec", "eagle3", "--head", head, "--k", "3", "--model-path",
                         tiny_llama_path, "--dtype", "float32", "--data", str(data), "--num-prompts", "2",
                         "--max-tokens", "12", "--json", str(tmp_path / "t.json")])
    verify = [row for row in r["by_kind"] if row["kind"].startswith("verify")]
    assert verify and r["tokens"] > 0
    assert all(row["draft_ms_mean"] > 0 and 0 <= row["draft_wait_ms_mean"] <= row["draft_ms_mean"] for row in verify)
    assert json.loads((tmp_path / "t.json").read_text())["steps"] == r["steps"]
    # --cprofile: the engine's own functions per step, the step loop's cumulative time covering its parts
    c = spec_trace.main(["--workload", "gsm8k", "--spec", "eagle3", "--head", head, "--k", "3", "--model-path",
                         tiny_llama_path, "--dtype", "float32", "--data", str(data), "--num-prompts", "1",
                         "--max-tokens", "8", "--cprofile"])["cprofile"]
    cum = dict(c["cumulative_ms_per_step"])
    step = next(v for name, v in cum.items() if name.startswith("step (core.py"))
    parts = [v for name, v in cum.items() if name.split(" (")[0] in ("execute_model", "sample_tokens")]
    assert c["steps"] > 0 and len(c["own_ms_per_step"]) == 30 and parts and all(0 < v <= step for v in parts)
