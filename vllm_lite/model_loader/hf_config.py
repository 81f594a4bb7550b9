"""config.json -> a config object, without importing transformers.

Importing transformers costs seconds of worker start-up (its import chain pulls sklearn, torch.distributed ops...)
and the worker only needs it to read config.json. For the model types we run (llama, mistral, qwen2, qwen3) this
module fills missing keys with the defaults of transformers 5's config classes (`save_pretrained` of older versions
omits keys equal to them) and normalises the legacy keys the way those classes do on load: `rope_scaling` /
`rope_theta` / `partial_rotary_factor` -> `rope_parameters`, `torch_dtype` -> `dtype`, `num_key_value_heads` and
`head_dim` derived when absent. Any other config (unknown model_type, remote code, nested per-layer rope settings)
is handed to transformers' AutoConfig, imported only then.
"""
from __future__ import annotations

import json
import os
from typing import Any

_FLOAT_TAG = "__float__"  # transformers' JSON encoding of NaN / +-Infinity
_BASE_DEFAULTS: dict[str, Any] = {
    "architectures": None, "dtype": None, "transformers_version": None, "output_hidden_states": False,
    "return_dict": True, "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "problem_type": None,
    "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": None,
    "tie_word_embeddings": False, "rope_parameters": None, "attention_dropout": 0.0,
}
_QWEN_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32, "max_position_embeddings": 32768,
    "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None,
    "bos_token_id": None, "eos_token_id": None,
}
# model_type -> the dataclass field defaults of transformers 5's LlamaConfig / MistralConfig / Qwen2Config /
# Qwen3Config (tests/test_hf_config.py checks them against the installed transformers).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_BASE_DEFAULTS, "intermediate_size": 11008, "num_key_value_heads": None,
              "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1,
              "attention_bias": False, "mlp_bias": False, "head_dim": None},
    "mistral": {**_BASE_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8, "head_dim": None,
                "max_position_embeddings": 4096 * 32, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096},
    "qwen2": {**_BASE_DEFAULTS, **_QWEN_DEFAULTS},
    "qwen3": {**_BASE_DEFAULTS, **_QWEN_DEFAULTS, "head_dim": 128, "attention_bias": False},
}
DEFAULT_ROPE_THETA = 10000.0
_ORIGINAL_LEN_ROPE_TYPES = ("llama3", "yarn", "longrope")


class HFConfig:
    """Attribute view of a model's config.json (plus class defaults), standing in for a transformers config: every
    key is an attribute, a missing one raises AttributeError (so `getattr(cfg, name, default)` works)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    @property
    def dtype(self) -> Any:
        """The checkpoint dtype as a torch.dtype (as transformers gives it); torch is imported only when asked."""
        value = self.__dict__.get("dtype")
        if isinstance(value, str):
            import torch
            value = getattr(torch, value)
        return value

    @dtype.setter
    def dtype(self, value: Any) -> None:
        self.__dict__["dtype"] = value

    @property
    def torch_dtype(self) -> Any:
        """Legacy name of `dtype` (transformers keeps it as an alias)."""
        return self.dtype

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """Legacy name of `rope_parameters` (transformers keeps it as an alias)."""
        return self.rope_parameters

    def to_dict(self) -> dict[str, Any]:
        """All attributes, as JSON-friendly values (dtype stays a name)."""
        out = dict(self.__dict__)
        if out.get("dtype") is not None and not isinstance(out["dtype"], str):
            out["dtype"] = str(out["dtype"]).removeprefix("torch.")
        return out

    def __repr__(self) -> str:
        return f"HFConfig({self.to_dict()!r})"


def load_hf_config(path: str) -> Any:
    """The config of the HF model folder `path`: an HFConfig for the supported model types, read without
    transformers; otherwise whatever transformers' AutoConfig makes of it (and its errors)."""
    raw = _read_config_json(os.path.join(path, "config.json"))
    if raw is None or not _is_plain(raw):
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(path)
    return HFConfig(_normalise(raw))


def _read_config_json(file: str) -> dict[str, Any] | None:
    """config.json as a dict, or None when it is missing or not a JSON object (AutoConfig then says why)."""
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f, object_hook=_decode_special_float)
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _decode_special_float(obj: dict[str, Any]) -> Any:
    if set(obj) == {_FLOAT_TAG} and isinstance(obj[_FLOAT_TAG], str):
        return float(obj[_FLOAT_TAG])  # "NaN", "Infinity", "-Infinity"
    return obj


def _is_plain(raw: dict[str, Any]) -> bool:
    """Whether this reader handles the config exactly as transformers would (else AutoConfig takes it)."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_DEFAULTS or "configuration_files" in raw:
        return False
    if "AutoConfig" in (raw.get("auto_map") or {}):  # remote code may define its own config class
        return False
    if model_type == "mistral" and "layer_types" in raw:  # AutoConfig loads these as "ministral"
        return False
    rope = raw.get("rope_scaling") or raw.get("rope_parameters")
    if rope is not None and (not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values())):
        return False  # per-layer-type (nested) rope settings
    return True


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """What transformers 5's config class __post_init__ makes of a config.json dict (for our model types)."""
    values = {**MODEL_DEFAULTS[raw["model_type"]], **raw}
    torch_dtype = values.pop("torch_dtype", None)
    if values["dtype"] is None:
        values["dtype"] = torch_dtype
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if "head_dim" in values and values["head_dim"] is None and raw["model_type"] in ("llama", "mistral"):
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if raw["model_type"] in ("qwen2", "qwen3"):
        if not values["use_sliding_window"]:
            values["sliding_window"] = None
        if values["layer_types"] is None:
            values["layer_types"] = [
                "sliding_attention" if values["sliding_window"] is not None and i >= values["max_window_layers"]
                else "full_attention" for i in range(values["num_hidden_layers"])]
    values["rope_parameters"] = _rope_parameters(values)
    return values


def _rope_parameters(values: dict[str, Any]) -> dict[str, Any]:
    """transformers' convert_rope_params_to_dict + standardize_rope_params: legacy `rope_scaling` replaces
    `rope_parameters`; top-level `rope_theta` / `partial_rotary_factor` move into it (popped from `values`)."""
    params = dict(values.pop("rope_scaling", None) or values["rope_parameters"] or {})
    params.setdefault("rope_theta", values.pop("rope_theta", DEFAULT_ROPE_THETA))
    partial_rotary_factor = values.pop("partial_rotary_factor", None)
    if partial_rotary_factor is not None:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in _ORIGINAL_LEN_ROPE_TYPES:
        params.setdefault("original_max_position_embeddings", values["max_position_embeddings"])
    return params
