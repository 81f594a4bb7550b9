"""Model name -> ModelInfo: a local HF-layout folder plus everything the engine needs to know before loading.

Accepted names: the default model ("smollm2-135m-instruct", any case), a local HF folder, a .gguf file or a folder
holding one (converted once into a cached HF folder), or a Hugging Face repo id (downloaded with huggingface_hub
when it is installed and the hub is reachable).

dtype "auto": on CUDA the checkpoint's dtype (config `dtype`/`torch_dtype`), with float32/unspecified checkpoints
run in bfloat16 (like vLLM); on CPU always float32, because CPU bf16/fp16 matmuls are slow and imprecise. An
explicit dtype is always honoured.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from vllm_lite.config import LoadConfig, ModelConfig
from vllm_lite.layers.rotary import max_rope_positions
from vllm_lite.model_loader.default_model import default_gguf_path, is_default_model
from vllm_lite.model_loader.gguf_loader import convert_gguf
from vllm_lite.model_loader.hf_config import load_hf_config
from vllm_lite.model_loader.weights import find_bin_files, find_safetensors
from vllm_lite.models.registry import architecture_of
from vllm_lite.protocol import ModelDescription

logger = logging.getLogger("vllm_lite.model_loader")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16,
           "float": torch.float32}


class ModelInfo(ModelDescription, kw_only=True, tag=False):
    """A resolved model: its description (what travels between processes) plus the parsed config."""
    hf_config: Any = None  # HFConfig (hf_config.py), or a transformers config

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_name]

    @classmethod
    def from_description(cls, desc: ModelDescription) -> "ModelInfo":
        """The ModelInfo a description was made from; its config is read from `path`/config.json on first use."""
        return cls(*(getattr(desc, f) for f in ModelDescription.__struct_fields__),
                   hf_config=_ConfigOnDemand(desc.path))


class _ConfigOnDemand:
    """Stands in for the model's config: loads `path`/config.json (without transformers) at the first attribute
    read (the engine core rarely needs it)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._config: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # private and dunder lookups (copy, pickle) never load the config
            raise AttributeError(name)
        if self._config is None:
            self._config = load_hf_config(self._path)
        return getattr(self._config, name)


def resolve_model(model_config: ModelConfig, load_config: LoadConfig, device: str | None = None) -> ModelInfo:
    """Locate (convert, download) the model and read its config; raise ValueError for what cannot run."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path, gguf_file = _local_folder(model_config.model, load_config)
    hf_config = load_hf_config(path)  # no transformers import (seconds of start-up)
    architecture = architecture_of(hf_config)
    load_format = _weights_format(path, load_config.load_format)
    limit = max_rope_positions(hf_config)
    if model_config.max_model_len is not None and model_config.max_model_len > limit:
        raise ValueError(f"max_model_len={model_config.max_model_len} is larger than the model's maximum context "
                         f"length {limit} (max_position_embeddings in {os.path.join(path, 'config.json')})")
    tokenizer = model_config.tokenizer or path
    dtype = str(_resolve_dtype(model_config.dtype, hf_config, device)).removeprefix("torch.")
    return ModelInfo(model=model_config.model, path=path, hf_config=hf_config, architecture=architecture,
                     tokenizer=tokenizer, dtype_name=dtype,
                     max_model_len=model_config.max_model_len or limit, eos_token_ids=_eos_ids(path, hf_config),
                     load_format=load_format, gguf_file=gguf_file, vocab_size=int(hf_config.vocab_size))


def _local_folder(name: str, load_config: LoadConfig) -> tuple[str, str | None]:
    """(HF folder, source GGUF file or None) for a model name."""
    cache_dir = load_config.download_dir
    if is_default_model(name) and not os.path.exists(name):
        gguf_path = default_gguf_path()
        return convert_gguf(gguf_path, cache_dir), gguf_path
    expanded = os.path.expanduser(name)
    if os.path.isfile(expanded):
        if not expanded.endswith(".gguf"):
            raise ValueError(f"model {name!r} is a file but not a .gguf file; pass an HF-layout folder")
        return convert_gguf(expanded, cache_dir), os.path.abspath(expanded)
    if os.path.isdir(expanded):
        has_config = os.path.exists(os.path.join(expanded, "config.json"))
        has_gguf = any(n.endswith(".gguf") for n in os.listdir(expanded))
        if has_gguf and (load_config.load_format == "gguf" or not has_config):
            from vllm_lite.model_loader.gguf_loader import find_gguf_file
            gguf_path = os.path.abspath(find_gguf_file(expanded))
            return convert_gguf(gguf_path, cache_dir), gguf_path
        if not has_config:
            raise ValueError(f"model folder {name!r} has no config.json (nor a .gguf file)")
        return os.path.abspath(expanded), None
    return _download(name, load_config), None


def _download(repo_id: str, load_config: LoadConfig) -> str:
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    if load_config.load_format == "dummy":
        patterns = [p for p in patterns if p != "*.safetensors"]
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, cache_dir=load_config.download_dir, allow_patterns=patterns)
    except Exception as e:  # no hub package, no network, unknown repo: one clear message
        raise ValueError(f"model {repo_id!r} is not a local folder or .gguf file and could not be fetched from "
                         f"the Hugging Face Hub ({type(e).__name__}: {e})") from e


def _weights_format(path: str, load_format: str) -> str:
    if load_format == "dummy":
        return "dummy"
    if find_safetensors(path):
        return "safetensors"
    if load_format == "safetensors":
        raise ValueError(f"load_format='safetensors' but {path} holds no *.safetensors files")
    if find_bin_files(path):
        return "pt"
    raise ValueError(f"no weights (*.safetensors or pytorch_model*.bin) in {path}; "
                     f"pass load_format='dummy' to run with random weights")


def _resolve_dtype(dtype: str, hf_config: Any, device: str) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device == "cpu":
        return torch.float32
    cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = _DTYPES.get(cfg_dtype.removeprefix("torch."))
    return cfg_dtype if cfg_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _eos_ids(path: str, hf_config: Any) -> tuple[int, ...]:
    eos = None
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
