"""The transformers reference (`--reference hf`): the eval's exact prompts through `generate` (greedy) on the same
model, and the agreement rule between two greedy runs, so a user sees whether a score change is the engine's.

Agreement per question: the same extracted answer, and vLLM's check_logprobs_close rule on the tokens: walk both
token sequences; at the first position where they differ, each side's token must be among the other side's top
logprobs there (a near tie: both are legitimate greedy choices under rounding), and the comparison stops, since the
continuations diverge from there on. Tokens are compared as the server prints them (each id decoded alone)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class RefAnswer:
    text: str
    tokens: list[str] = field(default_factory=list)
    top_logprobs: list[dict[str, float]] = field(default_factory=list)


def compare_tokens(tokens_a: Sequence[str], top_a: Sequence[dict[str, float]], tokens_b: Sequence[str],
                   top_b: Sequence[dict[str, float]]) -> tuple[str, int | None]:
    """('identical' | 'near_tie' | 'mismatch', first divergence index or None) under check_logprobs_close's rule;
    a sequence that is a prefix of the other (one stopped earlier) counts as identical up to its end."""
    for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
        if a == b:
            continue
        in_b = i < len(top_b) and a in top_b[i]
        in_a = i < len(top_a) and b in top_a[i]
        return ("near_tie" if in_a and in_b else "mismatch"), i
    return "identical", None


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string (the server drops the stop string and everything after it)."""
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


class HFReference:
    """Greedy `generate` on the engine's model (the same resolved folder, tokenizer and dtype rule)."""

    def __init__(self, model: str, dtype: str = "auto", device: str | None = None, num_logprobs: int = 5,
                 download_dir: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vllm_lite.config import LoadConfig, ModelConfig
        from vllm_lite.model_loader.resolve import resolve_model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        info = resolve_model(ModelConfig(model=model, dtype=dtype), LoadConfig(download_dir=download_dir),
                             self.device)
        self.dtype_name = info.dtype_name
        self.eos_token_ids = list(info.eos_token_ids)
        self.tokenizer = AutoTokenizer.from_pretrained(info.tokenizer)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(info.path, dtype=getattr(torch, info.dtype_name))
        self.model.to(self.device).eval()
        self.num_logprobs = num_logprobs
        self.wall_s = 0.0

    def encode(self, prompt: str, chat: bool) -> list[int]:
        """Token ids exactly as the server builds them (completions: add_special_tokens; chat: the template)."""
        if chat:
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                           add_generation_prompt=True, return_dict=False))
        return list(self.tokenizer(prompt).input_ids)

    def generate(self, prompts: Sequence[str], max_tokens: int, stop: Sequence[str], chat: bool = False,
                 batch_size: int = 8) -> list[RefAnswer]:
        """Greedy answers in input order; prompts of similar length are batched together (left padding)."""
        import torch
        start = time.perf_counter()
        encoded = [self.encode(p, chat) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        out: list[RefAnswer | None] = [None] * len(prompts)
        pad = self.tokenizer.pad_token_id
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                    max_new_tokens=max_tokens, stop_strings=list(stop) or None, tokenizer=self.tokenizer,
                    eos_token_id=self.eos_token_ids or None, pad_token_id=pad, output_logits=True,
                    return_dict_in_generate=True, temperature=None, top_p=None, top_k=None)
            new = gen.sequences[:, width:].cpu()
            logprobs = torch.stack(gen.logits, dim=1).float().log_softmax(-1)
            top_lp, top_ids = logprobs.topk(self.num_logprobs, dim=-1)
            for row, i in enumerate(idx):
                out[i] = self._answer(new[row].tolist(), top_ids[row].cpu().tolist(), top_lp[row].cpu().tolist(),
                                      stop)
        self.wall_s += time.perf_counter() - start
        return [a for a in out if a is not None]

    def _answer(self, new_ids: list[int], top_ids: list[list[int]], top_lp: list[list[float]],
                stop: Sequence[str]) -> RefAnswer:
        ends = set(self.eos_token_ids) | {self.tokenizer.pad_token_id}  # rows that stopped early are padded
        n = len(new_ids)
        for j, t in enumerate(new_ids):  # generated length: up to and including the first EOS (or padding)
            if t in ends:
                n = j + 1
                break
        ids = new_ids[:n]
        decode = self.tokenizer.decode
        text = truncate_at_stop(decode([t for t in ids if t not in ends], skip_special_tokens=True), stop)
        tokens = [decode([t]) for t in ids]
        tops = [{decode([t]): lp for t, lp in zip(tids, lps)} for tids, lps in zip(top_ids[:n], top_lp[:n])]
        return RefAnswer(text=text, tokens=tokens, top_logprobs=tops)
