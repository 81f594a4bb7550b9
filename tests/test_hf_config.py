"""The transformers-free config.json reader against transformers' AutoConfig: the same attributes (class defaults,
legacy keys, rope scaling) and the same rotary values, for every model type we run; and resolving a model, warm
GGUF cache included, imports no transformers."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from vllm_lite.layers.rotary import compute_inv_freq, get_rope, head_dim_of, max_rope_positions, rope_parameters
from vllm_lite.model_loader.gguf_loader import converted_path
from vllm_lite.model_loader.hf_config import MODEL_DEFAULTS, HFConfig, load_hf_config
from vllm_lite.models.registry import MODEL_TYPE_TO_ARCH, architecture_of

CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
# What vllm_lite reads from a config (models/decoder.py, layers/rotary.py, worker/model_runner.py, model_loader/,
# models/registry.py), legacy aliases included.
READ_ATTRS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "vocab_size",
              "tie_word_embeddings", "rope_theta", "rope_parameters", "rope_scaling", "partial_rotary_factor",
              "original_max_position_embeddings", "attention_bias", "mlp_bias", "use_sliding_window",
              "sliding_window", "architectures", "model_type", "dtype", "torch_dtype", "eos_token_id")
_MISSING = object()

ROPES = {
    "linear": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 1024,
             "beta_fast": 16, "beta_slow": 2, "attention_factor": 0.9},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5},
}


def _class(model_type: str):
    import transformers
    return getattr(transformers, CONFIG_CLASSES[model_type])


def _non_default(model_type: str, rope: dict | None, tie: bool) -> dict:
    """Every attribute we read set away from the class default: GQA, biases, head_dim, dtype, eos list..."""
    fields = {f.name for f in dataclasses.fields(_class(model_type))}
    kwargs = dict(vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, hidden_act="gelu", max_position_embeddings=4096, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, eos_token_id=[5, 7], dtype="bfloat16",
                  attention_bias=True, mlp_bias=True, head_dim=32, use_sliding_window=True, sliding_window=512)
    kwargs = {k: v for k, v in kwargs.items() if k in fields or k == "dtype"}
    if rope is not None:
        kwargs["rope_parameters"] = dict(rope)
    return kwargs


def _save(tmp_path, name: str, model_type: str, **kwargs) -> str:
    config = _class(model_type)(**kwargs)
    config.architectures = [MODEL_TYPE_TO_ARCH[model_type]]
    path = str(tmp_path / name)
    config.save_pretrained(path)
    return path


def _write_json(tmp_path, name: str, raw: dict) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(raw))
    return str(path)


def _assert_same_as_transformers(path: str) -> HFConfig:
    from transformers import AutoConfig

    ours, ref = load_hf_config(path), AutoConfig.from_pretrained(path)
    assert isinstance(ours, HFConfig)
    names = set(READ_ATTRS) | {f.name for f in dataclasses.fields(type(ref))} - {"id2label", "label2id"}
    for name in sorted(names):
        assert getattr(ours, name, _MISSING) == getattr(ref, name, _MISSING), name
    assert architecture_of(ours) == architecture_of(ref)
    assert rope_parameters(ours) == rope_parameters(ref)
    assert head_dim_of(ours) == head_dim_of(ref) and max_rope_positions(ours) == max_rope_positions(ref)
    (inv, scale), (ref_inv, ref_scale) = compute_inv_freq(ours), compute_inv_freq(ref)
    assert torch.equal(inv, ref_inv) and scale == ref_scale
    assert torch.equal(get_rope(ours, 64).cos_sin_cache, get_rope(ref, 64).cos_sin_cache)
    return ours


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
def test_defaults_are_transformers_class_defaults(model_type):
    fields = [f for f in dataclasses.fields(_class(model_type)) if f.name not in ("id2label", "label2id")]
    assert {f.name: f.default for f in fields} == MODEL_DEFAULTS[model_type]


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
def test_class_defaults_saved(tmp_path, model_type):
    _assert_same_as_transformers(_save(tmp_path, "cfg", model_type))


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
@pytest.mark.parametrize("rope", [None, "linear", "dynamic", "llama3", "yarn", "yarn_mscale"])
def test_non_default_values_saved(tmp_path, model_type, rope):
    tie = rope in (None, "llama3", "yarn")
    path = _save(tmp_path, "cfg", model_type, **_non_default(model_type, ROPES.get(rope), tie))
    ours = _assert_same_as_transformers(path)
    assert ours.num_key_value_heads == 2 and ours.tie_word_embeddings is tie and ours.dtype is torch.bfloat16


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
def test_minimal_config_json_gets_class_defaults(tmp_path, model_type):
    """A hand-written config.json with nothing but the model type: every value comes from the defaults."""
    _assert_same_as_transformers(_write_json(tmp_path, "cfg", {"model_type": model_type}))


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
@pytest.mark.parametrize("scaling", [
    None,
    {"type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512},
    {"type": "yarn", "factor": 4.0},
])
def test_legacy_keys(tmp_path, model_type, scaling):
    """transformers 4 style: rope_theta + rope_scaling, torch_dtype, no num_key_value_heads / head_dim, and a
    top-level original_max_position_embeddings (transformers keeps it as a plain attribute)."""
    raw = {"model_type": model_type, "architectures": [MODEL_TYPE_TO_ARCH[model_type]], "hidden_size": 64,
           "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 2048,
           "rope_theta": 500000.0, "torch_dtype": "float16", "original_max_position_embeddings": 256,
           "rope_scaling": scaling, "some_extra_key": [1, 2]}
    ours = _assert_same_as_transformers(_write_json(tmp_path, "cfg", raw))
    assert ours.dtype is torch.float16 and ours.torch_dtype is torch.float16 and ours.some_extra_key == [1, 2]
    assert ours.num_key_value_heads == (MODEL_DEFAULTS[model_type]["num_key_value_heads"] or 4)  # qwen: 32!
    assert not hasattr(ours, "missing_key") and getattr(ours, "missing_key", 3) == 3


def test_partial_rotary_factor_moves_into_rope_parameters(tmp_path):
    raw = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "partial_rotary_factor": 0.5}
    ours = _assert_same_as_transformers(_write_json(tmp_path, "cfg", raw))
    assert ours.rope_parameters["partial_rotary_factor"] == 0.5 and compute_inv_freq(ours)[0].shape == (4,)


def test_other_configs_go_to_transformers(tmp_path):
    from transformers import PreTrainedConfig

    gpt2 = _write_json(tmp_path, "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    cfg = load_hf_config(gpt2)
    assert isinstance(cfg, PreTrainedConfig)
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported"):
        architecture_of(cfg)
    ministral = _write_json(tmp_path, "ministral", {"model_type": "mistral", "layer_types": ["full_attention"] * 32})
    assert type(load_hf_config(ministral)).__name__ == "MinistralConfig"
    with pytest.raises(OSError):
        load_hf_config(str(tmp_path / "nowhere"))


def test_unsupported_architecture_error_unchanged(tmp_path):
    raw = {"model_type": "llama", "architectures": ["FancyForCausalLM"]}
    with pytest.raises(ValueError, match="'FancyForCausalLM' is not supported; supported architectures"):
        architecture_of(load_hf_config(_write_json(tmp_path, "cfg", raw)))


def test_resolve_imports_no_transformers(tiny_qwen3_path, tmp_path):
    """A local folder and a GGUF file whose converted folder is cached: resolved without importing transformers."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not read: the converted folder exists")
    cache = str(tmp_path / "cache")
    converted = converted_path(str(gguf), cache)
    os.makedirs(converted)
    for name in os.listdir(tiny_qwen3_path):
        os.link(os.path.join(tiny_qwen3_path, name), os.path.join(converted, name))
    code = ("import sys\n"
            "from vllm_lite.config import LoadConfig, ModelConfig\n"
            "from vllm_lite.model_loader import resolve_model\n"
            f"for name in ({tiny_qwen3_path!r}, {str(gguf)!r}):\n"
            f"    info = resolve_model(ModelConfig(model=name), LoadConfig(download_dir={cache!r}), device='cpu')\n"
            "    print(info.architecture, info.path, info.hf_config.head_dim)\n"
            "print('transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines == [f"Qwen3ForCausalLM {os.path.abspath(tiny_qwen3_path)} 16", f"Qwen3ForCausalLM {converted} 16",
                     "False"]
