"""The offline `LLM` API end to end on a tiny model: seeds, sampling filters, stops, n, chat, errors."""
from __future__ import annotations

import pytest

from vllm_lite import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from tiny_models import make_tiny_model
    path = make_tiny_model(tmp_path_factory.mktemp("api"), "qwen3")
    return LLM(path, device="cpu", dtype="float32", max_model_len=128, seed=0)


def _ids(o):
    return o.outputs[0].token_ids


def test_seed_reproduces_alone_and_in_mixed_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate("Hello world", seeded, use_tqdm=False)[0]
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = llm.generate(["The quick brown fox", "Hello world", "Once upon a time", "Hello world"],
                         [other, seeded, other, SamplingParams(temperature=0.7, seed=9, max_tokens=5)],
                         use_tqdm=False)
    assert _ids(batch[1]) == _ids(alone)
    unseeded = [_ids(o) for o in llm.generate(["Hello world"] * 4, other, use_tqdm=False)]
    assert len({tuple(u) for u in unseeded}) > 1  # without a seed the draws differ


def test_temperature_zero_equals_greedy_argmax(llm):
    greedy = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                        logprobs=1), use_tqdm=False)[0].outputs[0]
    for tok, lp in zip(greedy.token_ids, greedy.logprobs):
        assert lp[tok].rank == 1


def test_top_k_never_leaves_allowed_set(llm):
    """top_k=2 at every step: each sampled token must be rank 1 or 2 under the raw distribution."""
    params = SamplingParams(temperature=1.5, top_k=2, max_tokens=8, ignore_eos=True, logprobs=2)
    outs = llm.generate(["Hello world"] * 16, params, use_tqdm=False)
    ranks = {lp[tok].rank for o in outs for tok, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)}
    assert ranks <= {1, 2} and ranks == {1, 2}


def test_stop_strings_stop_token_ids_and_lengths(llm):
    base = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 30
    stop_tok = base.token_ids[5]
    first = base.token_ids.index(stop_tok)
    o = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                   stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop_tok and o.token_ids == base.token_ids[: first + 1]
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        o = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                         use_tqdm=False)[0].outputs[0]
        assert o.finish_reason == "stop" and o.stop_reason == stop
        assert o.text == text[: text.index(stop)] and stop not in o.text
    o = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=4, min_tokens=4),
                     use_tqdm=False)[0].outputs[0]
    assert len(o.token_ids) == 4


def test_min_tokens_blocks_stop_ids_then_releases_them(llm):
    """Stop ids cannot be sampled before min_tokens, and can be after: half the vocabulary stops, the batch stays the
    same for many steps (the sampling metadata is reused between steps, so a stale block or a lost one shows)."""
    vocab = llm.info.vocab_size
    stops = list(range(vocab // 2))
    params = SamplingParams(temperature=5.0, seed=1, min_tokens=8, max_tokens=48, stop_token_ids=stops,
                            ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": [10 + i, 20, 30]} for i in range(6)], params, use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert not set(c.token_ids[:8]) & set(stops), c.token_ids
        assert c.finish_reason == "stop" and len(c.token_ids) > 8 and c.token_ids[-1] in stops, c.token_ids


def test_n_choices_and_prompt_forms(llm):
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}, "Hello"],
                        SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [3, 3]
    assert outs[0].prompt_token_ids == [5, 6, 7] and outs[1].prompt == "Hello"
    assert [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1


def test_chat_applies_template(llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False).input_ids
    assert out.prompt_token_ids == expected
    two = llm.chat([msgs, [{"role": "user", "content": "Yo"}]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(two) == 2


def test_bad_input_is_a_clear_error_and_engine_keeps_working(llm):
    with pytest.raises(ValueError, match="200 tokens.*128"):
        llm.generate({"prompt_token_ids": [5] * 200}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        llm.generate({"prompt_token_ids": [10**6]}, use_tqdm=False)
    assert len(_ids(llm.generate("Hi", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0])) == 3


def test_invalid_engine_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="dtype.*allowed"):
        LLM(str(tmp_path), dtype="float64")
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(tmp_path), block_size=0)
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(str(tmp_path), not_a_flag=1)
    with pytest.raises(ValueError, match="max_cudagraph_capture_size"):
        LLM(str(tmp_path), max_cudagraph_capture_size=0)
    with pytest.raises(ValueError, match="max_prefill_graph_tokens"):
        LLM(str(tmp_path), max_prefill_graph_tokens=-1)
    with pytest.raises(ValueError, match="prefill_graph_requests"):
        LLM(str(tmp_path), prefill_graph_requests=0)


def test_startup_heap_is_frozen_while_the_llm_lives(tmp_path):
    """The engine's start-up objects are out of the collector's view (no full-collection stalls mid-run); once
    the LLM is dropped the freeze ends, so its reference cycles (graphs, compiled model) can be collected."""
    import gc
    import weakref

    from tiny_models import make_tiny_model
    gc.unfreeze()
    llm = LLM(make_tiny_model(tmp_path, "llama"), device="cpu", dtype="float32", max_model_len=64)
    assert gc.get_freeze_count() > 1000
    engine = weakref.ref(llm.engine)
    with pytest.raises(ValueError, match="token id -1 is out of the vocabulary"):
        llm.generate({"prompt_token_ids": [3, -1]}, use_tqdm=False)
    del llm
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert engine() is None


@pytest.mark.parametrize("name,gib,want", [("NVIDIA H100 80GB HBM3", 79.6, (16384, 1024)),
                                           ("NVIDIA H200", 139.8, (16384, 1024)),
                                           ("NVIDIA A100-SXM4-80GB", 79.2, None),
                                           ("NVIDIA L4", 22.0, None)])
def test_offline_batch_defaults_follow_vllm(monkeypatch, name, gib, want):
    """Like vLLM's LLM class: 16384 batched tokens / 1024 seqs on >= 70 GiB GPUs but the A100, else the
    SchedulerConfig defaults (which the server always uses); explicit arguments win."""
    import types

    import torch

    from vllm_lite.config import EngineConfig, SchedulerConfig, offline_batch_defaults
    props = types.SimpleNamespace(name=name, total_memory=int(gib * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    got = offline_batch_defaults("cuda")
    assert got == ({} if want is None else {"max_num_batched_tokens": want[0], "max_num_seqs": want[1]})
    assert offline_batch_defaults("cpu") == {}
    assert (SchedulerConfig.max_num_batched_tokens, SchedulerConfig.max_num_seqs) == (8192, 256)
    merged = EngineConfig.from_kwargs(**{**got, "max_num_seqs": 64})
    assert merged.scheduler.max_num_seqs == 64
    assert merged.scheduler.max_num_batched_tokens == (want[0] if want else 8192)


def test_reset_prefix_cache_makes_the_next_run_compute_its_prompt(llm):
    """A repeated prompt finds its blocks cached; after reset_prefix_cache (as vLLM's LLM has) it is computed again,
    with the same greedy output."""
    prompt = {"prompt_token_ids": list(range(3, 60))}
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    assert llm.reset_prefix_cache()
    cold = llm.generate(prompt, params, use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0
    assert _ids(first) == _ids(again) == _ids(cold)
