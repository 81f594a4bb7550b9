"""Architecture name (config.json `architectures[0]`) -> model class."""
from __future__ import annotations

from typing import Any

from torch import nn

from vllm_lite.models.decoder import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

# model_type -> architecture, for configs without `architectures` (e.g. built from a GGUF file).
MODEL_TYPE_TO_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def architecture_of(hf_config: Any) -> str:
    """The architecture a config names, falling back to its model_type; unsupported ones raise ValueError."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return arch
    arch = archs[0] if archs else MODEL_TYPE_TO_ARCH.get(getattr(hf_config, "model_type", ""), "")
    get_model_class(arch or f"<none; model_type={getattr(hf_config, 'model_type', None)!r}>")
    return arch


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"model architecture {architecture!r} is not supported; supported architectures: "
                         f"{', '.join(supported_architectures())}") from None
