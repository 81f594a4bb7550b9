"""GGUF -> cached HF-layout folder (config.json, tokenizer, generation_config.json, dequantised safetensors).

Converting once lets the rest of the engine see only HF folders: the same config parsing, tokenizer and weight
loader serve GGUF and safetensors models. Config and tokenizer come from transformers' GGUF support; weights are
dequantised with the `gguf` package and renamed to HF names (llama.cpp's q/k rotary permutation undone for llama,
exactly as transformers' LlamaTensorProcessor does). The folder lives in
`$XDG_CACHE_HOME/vllm_lite/<file stem>-<hash of size+mtime>` (default ~/.cache) and is reused while the file is
unchanged; it is written to a temporary folder and renamed, so a crash or a concurrent conversion never leaves a
half-written folder behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time

import numpy as np
import torch

from vllm_lite import envs

logger = logging.getLogger("vllm_lite.model_loader.gguf")

CONVERTER_VERSION = 1
SHARD_BYTES = 4 << 30
# Quantised models up to this many parameters are stored as float32 (exactly the dequantised values); larger ones
# as float16 (GGUF block scales are fp16, so magnitudes fit) to keep the cache folder a sane size.
FP32_MAX_PARAMS = 2_000_000_000

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def gguf_to_hf_name(name: str) -> str | None:
    """HF parameter name of a GGUF tensor name, or None for tensors the models do not use (e.g. rope_freqs)."""
    m = _BLOCK_RE.match(name)
    if m:
        hf = _BLOCK_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{hf}.{m.group(3)}" if hf else None
    base, _, leaf = name.rpartition(".")
    hf = _GLOBAL_NAMES.get(base)
    return f"{hf}.{leaf}" if hf else None


def reverse_llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permute of q/k rows (interleaved -> rotate_half halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def cache_root(cache_dir: str | None = None) -> str:
    if cache_dir:
        return cache_dir
    return envs.cache_root()


def converted_path(gguf_path: str, cache_dir: str | None = None) -> str:
    """Where the HF folder of this GGUF file lives: keyed by name, size and mtime (a changed file converts anew)."""
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:v{CONVERTER_VERSION}".encode()).hexdigest()[:12]
    stem = os.path.basename(gguf_path)[: -len(".gguf")] if gguf_path.endswith(".gguf") else os.path.basename(gguf_path)
    return os.path.join(cache_root(cache_dir), f"{stem}-{key}")


def find_gguf_file(path: str) -> str:
    """The .gguf file a path names: the file itself, or the single .gguf in a folder."""
    if os.path.isfile(path):
        return path
    found = sorted(n for n in os.listdir(path) if n.endswith(".gguf")) if os.path.isdir(path) else []
    if len(found) != 1:
        raise ValueError(f"expected exactly one .gguf file in {path}, found {found or 'none'}")
    return os.path.join(path, found[0])


def convert_gguf(path: str, cache_dir: str | None = None) -> str:
    """HF-layout folder for a GGUF file (or a folder holding one), converting it on first use."""
    gguf_path = os.path.abspath(find_gguf_file(path))
    out = converted_path(gguf_path, cache_dir)
    if os.path.exists(os.path.join(out, "config.json")):
        logger.info("using converted GGUF model %s", out)
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    logger.info("converting %s into an HF folder at %s (once)", gguf_path, out)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=os.path.dirname(out))
    try:
        _write_hf_folder(gguf_path, tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first
            if not os.path.exists(os.path.join(out, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted GGUF model in %.1fs", time.perf_counter() - t0)
    return out


def _write_hf_folder(gguf_path: str, out: str) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    arch = _ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ValueError(f"GGUF architecture {config.model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(_ARCHITECTURES))}")
    config.architectures = [arch]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out)

    weights, dtype = read_gguf_weights(gguf_path, config)
    config.tie_word_embeddings = "lm_head.weight" not in weights
    config.dtype = dtype
    _save_safetensors(weights, out)
    config.save_pretrained(out)

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    if eos is not None:
        GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=config.pad_token_id).save_pretrained(out)
    with open(os.path.join(out, "vllm_lite_source.json"), "w") as f:
        json.dump({"gguf_file": gguf_path, "converter_version": CONVERTER_VERSION}, f, indent=2)


def read_gguf_weights(gguf_path: str, config) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """All tensors of a GGUF file, dequantised and under HF names; plus the compute dtype the file suggests."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    permute = config.model_type == "llama"
    total = sum(int(np.prod(t.shape)) for t in reader.tensors)
    types = {t.tensor_type for t in reader.tensors if len(t.shape) >= 2}
    store = torch.float32 if total <= FP32_MAX_PARAMS else torch.float16
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            logger.debug("skipping GGUF tensor %s", t.name)
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if permute and ".attn_q." in t.name:
            w = reverse_llama_permute(w, n_head)
        elif permute and ".attn_k." in t.name:
            w = reverse_llama_permute(w, n_kv)
        tensor = torch.from_numpy(np.array(w, copy=True))  # owns its memory (not the mmap)
        weights[hf] = tensor.to(store if tensor.is_floating_point() else tensor.dtype)
    return weights, _compute_dtype(types)


def _compute_dtype(types: set) -> torch.dtype:
    """float32/float16/bfloat16 for unquantised files of that type; bfloat16 for quantised ones (on CPU, "auto"
    still resolves to float32)."""
    from gguf import GGMLQuantizationType as Q

    if types == {Q.F32}:
        return torch.float32
    if types <= {Q.F16, Q.F32}:
        return torch.float16
    return torch.bfloat16


def _save_safetensors(weights: dict[str, torch.Tensor], out: str) -> None:
    """model.safetensors, or shards plus model.safetensors.index.json when larger than SHARD_BYTES."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
