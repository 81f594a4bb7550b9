"""Self-distillation data for an EAGLE-3 head: the target's own greedy responses and, per token, its low / mid / high
hidden states and its greedy next token, written chunk by chunk into safetensors shards (bounded memory).

A chunk of prompts is answered by the engine (`LLM.generate`, greedy, batched), then the target runs once more over
prompt + response in transformers (same weights, `output_hidden_states`: hidden_states[i] is the residual stream
entering layer i, what the engine hands the drafter) to get the three hidden states and the argmax of its logits at
every position. A shard holds, for its sequences packed end to end: `tokens`, `aux` [N, 3H] (in the layer order of
`aux_layers`), `labels` (the target's greedy token after each position), `loss_mask` (positions whose next token is
part of the response) and `cu_seqlens`, plus `label_counts` over the masked labels (for the draft vocabulary).
`meta.json` lists the shards; a rerun with the same settings reuses the shards already written.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_lite.entrypoints.llm import LLM
from vllm_lite.evals.gsm8k import find_data_dir, load_jsonl
from vllm_lite.sampling_params import SamplingParams
from vllm_lite.tokenizer import apply_chat_template

logger = logging.getLogger("vllm_lite.train_draft")

META = "meta.json"


@dataclass(frozen=True)
class DataConfig:
    model: str
    data: str | None  # a JSONL of prompts, or None for GSM8K's training questions
    out_dir: str  # where the shards go (HEAD_DIR/data)
    num_samples: int | None = None  # the first N prompts (all when None)
    max_tokens: int = 512  # response length limit
    max_seq_len: int = 1024  # prompt + response tokens kept per sequence
    prompts_per_shard: int = 1024
    forward_batch_tokens: int = 16384  # tokens per transformers forward (padded)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # device, dtype, seed, ... for the LLM


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """eagle.py's default (2, L/2, L-3), clamped into the model for shallow ones."""
    return (min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0))


def load_conversations(path: str | None, limit: int | None = None) -> list[list[dict[str, Any]]]:
    """One conversation per JSONL row: `messages` (a trailing assistant turn is dropped: the target answers),
    `prompt` or `question` (one user turn). No path: GSM8K's train.jsonl from shared/data/gsm8k."""
    if path is None or os.path.isdir(path):
        path = os.path.join(find_data_dir(path), "train.jsonl")
    convs = []
    for i, row in enumerate(load_jsonl(path)):
        if "messages" in row:
            msgs = list(row["messages"])
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
        elif "prompt" in row or "question" in row:
            msgs = [{"role": "user", "content": row.get("prompt", row.get("question"))}]
        else:
            raise ValueError(f"{path} line {i + 1}: a row needs 'messages', 'prompt' or 'question'")
        if msgs:
            convs.append(msgs)
        if limit is not None and len(convs) >= limit:
            break
    if not convs:
        raise ValueError(f"{path} holds no prompts")
    return convs


def loss_mask(prompt_len: int, n: int) -> np.ndarray:
    """Positions q whose label (the token after q) is a response token: q in [prompt_len - 1, n - 2]; the last
    position's label would follow the end of the response."""
    mask = np.zeros(n, dtype=np.uint8)
    mask[max(prompt_len - 1, 0): n - 1] = 1
    return mask


@torch.no_grad()
def target_features(model: Any, seqs: list[list[int]], aux_layers: tuple[int, ...], batch_tokens: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(aux [n, 3H], labels [n]) per sequence, in order; padded batches of about batch_tokens tokens."""
    device = next(model.parameters()).device
    lm_head = model.get_output_embeddings()
    i = 0
    while i < len(seqs):
        j = i + 1
        while j < len(seqs) and (j + 1 - i) * max(len(s) for s in seqs[i:j + 1]) <= batch_tokens:
            j += 1
        batch = seqs[i:j]
        t = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), t, dtype=torch.long)
        mask = torch.zeros(len(batch), t, dtype=torch.long)
        for r, s in enumerate(batch):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        out = model.model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        aux = torch.cat([out.hidden_states[k] for k in aux_layers], dim=-1)
        final = out.last_hidden_state
        labels = torch.cat([lm_head(final[r: r + 1]).argmax(dim=-1) for r in range(len(batch))])
        aux, labels = aux.cpu(), labels.cpu()
        for r, s in enumerate(batch):
            yield aux[r, :len(s)], labels[r, :len(s)]
        i = j


def _write_shard(path: str, items: list[tuple[list[int], int, torch.Tensor, torch.Tensor]], vocab: int) -> dict:
    """items: (tokens, prompt_len, aux, labels) per sequence."""
    lens = [len(t) for t, _, _, _ in items]
    masks = [loss_mask(p, len(t)) for t, p, _, _ in items]
    labels = torch.cat([lab for _, _, _, lab in items]).to(torch.int32)
    mask = torch.from_numpy(np.concatenate(masks))
    counts = torch.bincount(labels[mask.bool()].long(), minlength=vocab)
    tensors = {"tokens": torch.tensor([x for t, _, _, _ in items for x in t], dtype=torch.int32),
               "aux": torch.cat([a for _, _, a, _ in items]).contiguous(), "labels": labels, "loss_mask": mask,
               "cu_seqlens": torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)),
               "label_counts": counts}
    tmp = path + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return {"file": os.path.basename(path), "seq_lens": lens, "num_tokens": int(sum(lens)),
            "num_loss_tokens": int(mask.sum())}


def _save_meta(out_dir: str, meta: dict) -> None:
    tmp = os.path.join(out_dir, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, os.path.join(out_dir, META))


def read_meta(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, META)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def label_counts(out_dir: str, meta: dict) -> np.ndarray:
    """Masked-label counts summed over the shards (read without loading the hidden states)."""
    total = np.zeros(meta["vocab_size"], dtype=np.int64)
    for shard in meta["shards"]:
        with safe_open(os.path.join(out_dir, shard["file"]), "pt") as f:
            total += f.get_tensor("label_counts").numpy()
    return total


def generate_data(cfg: DataConfig, aux_layers: tuple[int, ...] | None = None) -> dict:
    """Write (or finish writing) the shards for cfg; returns meta.json's content. Prints timings."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "forward_batch_tokens")}
    convs = load_conversations(cfg.data, cfg.num_samples)
    meta = read_meta(cfg.out_dir)
    if meta is not None and (meta["settings"] != settings or (aux_layers and tuple(meta["aux_layers"]) != aux_layers)):
        raise ValueError(f"{cfg.out_dir} holds data made with other settings ({meta['settings']}, aux layers "
                         f"{meta['aux_layers']}); remove it or pick another --out")
    if meta is not None and meta["complete"]:
        return meta
    llm = LLM(cfg.model, **cfg.engine_kwargs)
    num_layers = int(llm.info.hf_config.num_hidden_layers)
    aux_layers = tuple(meta["aux_layers"] if meta else aux_layers or default_aux_layers(num_layers))
    meta = meta or {"settings": settings, "model_path": llm.info.path, "aux_layers": list(aux_layers),
                    "num_layers": num_layers, "hidden_size": int(llm.info.hf_config.hidden_size),
                    "vocab_size": int(llm.info.vocab_size), "num_prompts": len(convs), "shards": [],
                    "generation_seconds": 0.0, "forward_seconds": 0.0, "num_output_tokens": 0, "complete": False}
    target = _load_target(llm.info.path, llm.device, llm.info.dtype)
    tok = llm.get_tokenizer()
    chat = getattr(tok, "chat_template", None) is not None
    done = len(meta["shards"])
    for start in range(done * cfg.prompts_per_shard, len(convs), cfg.prompts_per_shard):
        chunk = convs[start: start + cfg.prompts_per_shard]
        prompts = [apply_chat_template(tok, c, None, True) if chat else tok(c[-1]["content"]).input_ids
                   for c in chunk]
        keep = [p for p in prompts if len(p) < cfg.max_seq_len - 1]
        params = [SamplingParams(temperature=0.0, max_tokens=min(cfg.max_tokens, cfg.max_seq_len - len(p)))
                  for p in keep]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in keep], params, use_tqdm=False) if keep else []
        t1 = time.perf_counter()
        seqs = [(list(p) + list(o.outputs[0].token_ids))[: cfg.max_seq_len] for p, o in zip(keep, outs)]
        order = sorted(range(len(seqs)), key=lambda r: len(seqs[r]))
        feats = target_features(target, [seqs[r] for r in order], aux_layers, cfg.forward_batch_tokens)
        items = [(seqs[r], len(keep[r]), aux, lab) for r, (aux, lab) in zip(order, feats)]
        path = os.path.join(cfg.out_dir, f"shard_{len(meta['shards']):05d}.safetensors")
        meta["shards"].append(_write_shard(path, items, meta["vocab_size"]) if items else
                              {"file": None, "seq_lens": [], "num_tokens": 0, "num_loss_tokens": 0})
        t2 = time.perf_counter()
        meta["generation_seconds"] += t1 - t0
        meta["forward_seconds"] += t2 - t1
        meta["num_output_tokens"] += sum(len(o.outputs[0].token_ids) for o in outs)
        _save_meta(cfg.out_dir, meta)
        logger.info("data: shard %d (%d prompts): generated %d tokens in %.1f s, target features + write %.1f s",
                    len(meta["shards"]) - 1, len(keep), sum(len(o.outputs[0].token_ids) for o in outs), t1 - t0,
                    t2 - t1)
    meta["shards"] = [s for s in meta["shards"] if s["file"]]
    meta["complete"] = True
    _save_meta(cfg.out_dir, meta)
    del target, llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return meta


def _load_target(path: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
