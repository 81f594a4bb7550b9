"""Prompt logprobs (SamplingParams.prompt_logprobs; the server's echo=true with logprobs) against transformers in
float32 on a tiny random model: every prompt token's logprob, its rank and the top-N at each position, across chunked
prefill, a prefix cache that already holds the prompt, and requests that do not ask beside ones that do."""
from __future__ import annotations

import random

import pytest
import torch

from vllm_lite import LLM, SamplingParams

TOL = 1e-4
NUM = 3


def _hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """[len-1, vocab] log-softmax of the logits predicting prompt tokens 1.. (row j predicts token j + 1)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _check(prompt: list[int], got, ref: torch.Tensor, num: int) -> None:
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for j, entry in enumerate(got[1:]):
        row, token = ref[j], prompt[j + 1]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=TOL), (j, token)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = torch.topk(row, num)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            if t in entry:
                assert entry[t].logprob == pytest.approx(v, abs=TOL)
            else:  # a near tie at the N-th place may pick the other token
                assert v == pytest.approx(top.values[-1].item(), abs=TOL)
        assert len(entry) in (num, num + 1)


@pytest.fixture(scope="module")
def tiny(tiny_llama_path):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, hf.config.vocab_size) for _ in range(n)] for n in (1, 2, 7, 61, 150)]
    return tiny_llama_path, hf, prompts


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_offline_prompt_logprobs_match_transformers(tiny, async_scheduling):
    path, hf, prompts = tiny
    # 48-token budget: the 61- and 150-token prompts are computed in chunks over several steps
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=256, seed=0, block_size=4,
              max_num_batched_tokens=48, enable_prefix_caching=True, async_scheduling=async_scheduling)
    asking = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=NUM, logprobs=1)
    plain = SamplingParams(temperature=0.0, max_tokens=3)
    llm.generate([{"prompt_token_ids": prompts[3]}], plain, use_tqdm=False)  # its blocks are now in the cache
    inputs = [{"prompt_token_ids": p} for p in prompts] * 2
    outs = llm.generate(inputs, [asking] * len(prompts) + [plain] * len(prompts), use_tqdm=False)
    for p, out in zip(prompts, outs[:len(prompts)]):
        _check(p, out.prompt_logprobs, _hf_prompt_logprobs(hf, p), NUM)
        assert out.num_cached_tokens == 0  # prompt logprobs skip prefix-cache hits
    for out, twin in zip(outs[len(prompts):], outs[:len(prompts)]):
        assert out.prompt_logprobs is None
        assert out.outputs[0].token_ids == twin.outputs[0].token_ids  # asking does not change the generation
    zero = llm.generate([{"prompt_token_ids": prompts[2]}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)[0]
    assert all(len(d) == 1 for d in zero.prompt_logprobs[1:])  # just the prompt token itself
    _check(prompts[2], zero.prompt_logprobs, _hf_prompt_logprobs(hf, prompts[2]), 0)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


PROMPT_TEXT = "The quick brown fox jumps over the lazy dog. Hello world! What is the capital of France?"


@pytest.fixture(scope="module")
def server(tiny):
    from server_utils import RemoteServer
    with RemoteServer(tiny[0], ["--device", "cpu", "--dtype", "float32", "--max-model-len", "256"]) as srv:
        yield srv


def test_server_echo_prompt_logprobs_match_transformers(tiny, server):
    """lm-eval's loglikelihood request: echo=true, logprobs=N, max_tokens=0 (prompt only, with its logprobs)."""
    import openai
    from transformers import AutoTokenizer
    path, hf, _ = tiny
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT_TEXT).input_ids
    ref = _hf_prompt_logprobs(hf, ids)
    client = openai.OpenAI(base_url=server.url_for("v1"), api_key="x")
    resp = client.completions.create(model=path, prompt=PROMPT_TEXT, echo=True, logprobs=NUM, max_tokens=0,
                                     temperature=0)
    choice = resp.choices[0]
    assert choice.text == PROMPT_TEXT and resp.usage.prompt_tokens == len(ids)
    lps = choice.logprobs
    assert len(lps.tokens) == len(ids) and lps.text_offset[0] == 0
    for j, t in enumerate(ids[1:]):
        row, top = ref[j], lps.top_logprobs[j + 1]
        assert lps.token_logprobs[j + 1] == pytest.approx(row[t].item(), abs=TOL)
        assert len(top) <= NUM + 1 and top[tok.decode([t])] == pytest.approx(row[t].item(), abs=TOL)
        best = torch.topk(row, NUM)
        for tid, v in zip(best.indices.tolist(), best.values.tolist()):
            text = tok.decode([tid])
            if text != tok.decode([t]) and "\ufffd" not in text:  # distinct texts (byte pieces may collide)
                assert top[text] == pytest.approx(v, abs=TOL), (j, text)
    # echo with generation: the prompt's logprobs, then the generated tokens' (greedy = transformers' argmax)
    resp = client.completions.create(model=path, prompt=ids, echo=True, logprobs=1, max_tokens=2, temperature=0)
    lps = resp.choices[0].logprobs
    assert len(lps.tokens) == len(ids) + 2 and resp.usage.completion_tokens == 2
    assert lps.token_logprobs[1:len(ids)] == pytest.approx([ref[j, t].item() for j, t in enumerate(ids[1:])],
                                                          abs=TOL)
    with torch.no_grad():
        first = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].float(), -1)
    assert lps.token_logprobs[len(ids)] == pytest.approx(first.max().item(), abs=TOL)
    # streamed: the first chunk holds the prompt text and its logprobs
    chunks = list(client.completions.create(model=path, prompt=PROMPT_TEXT, echo=True, logprobs=0, max_tokens=0,
                                            temperature=0, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert text == PROMPT_TEXT and len(streamed) == len(ids) and streamed[0] is None
    assert streamed[1:] == pytest.approx([ref[j, t].item() for j, t in enumerate(ids[1:])], abs=TOL)
    # max_tokens=0 without echo stays an error
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=path, prompt=PROMPT_TEXT, max_tokens=0)
