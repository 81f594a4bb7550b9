"""Our Llama/Qwen2/Qwen3 against transformers: logits on one flat multi-sequence prefill over the paged KV cache,
rotary inverse frequencies per rope type, the registry and weight-loading errors."""
import pytest
import torch
from tiny_models import make_tiny_model, prefill_logits, tiny_config

from vllm_lite.attention import AttentionContext, TorchAttentionBackend
from vllm_lite.config import LoadConfig, ModelConfig
from vllm_lite.layers.rotary import compute_inv_freq, get_rope
from vllm_lite.model_loader import load_model, resolve_model
from vllm_lite.models import WeightLoadError, get_model_class
from vllm_lite.model_loader.weights import checkpoint_weights

PROMPTS = [[5, 17, 99, 3, 250, 7, 8], [300, 2], [11], list(range(40, 70)), [1, 1, 1, 383, 200]]

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}


def _ours(path):
    info = resolve_model(ModelConfig(model=path), LoadConfig(), device="cpu")
    ctx = AttentionContext(TorchAttentionBackend())
    return load_model(info, LoadConfig(), "cpu", ctx), ctx


def _compare_with_hf(path):
    from transformers import AutoModelForCausalLM

    model, ctx = _ours(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = prefill_logits(model, ctx, PROMPTS)
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert ours[3].std() > 1.0  # peaked logits: greedy comparisons are robust


def test_logits_match_transformers(tiny_model_path):
    _compare_with_hf(tiny_model_path)


@pytest.mark.parametrize("arch,overrides", [
    ("qwen3", {"tie_word_embeddings": True}),
    ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("qwen3", {"rope_parameters": YARN_ROPE}),
    ("qwen2", {"rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4}),
])
def test_logits_match_transformers_variants(tiny_model_factory, arch, overrides):
    _compare_with_hf(tiny_model_factory(arch, **overrides))


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    LLAMA3_ROPE,
    YARN_ROPE,
    {**YARN_ROPE, "attention_factor": 0.9, "beta_fast": 16, "beta_slow": 2},
    {**YARN_ROPE, "mscale": 1.0, "mscale_all_dim": 0.5},
])
def test_inv_freq_matches_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny_config("llama", rope_parameters=dict(rope), head_dim=32)
    ours, scale = compute_inv_freq(cfg)
    if rope["rope_type"] == "default":
        want, want_scale = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 32, 2).float() / 32)), 1.0
    else:
        want, want_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
    torch.testing.assert_close(ours, want, atol=0, rtol=0)
    assert scale == pytest.approx(want_scale)


def test_legacy_rope_scaling_config():
    """Older configs: rope_theta + rope_scaling {"type": ...}."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=64, num_attention_heads=4, max_position_embeddings=64, rope_theta=1000.0,
                          rope_scaling={"type": "linear", "factor": 2.0})
    inv, _ = compute_inv_freq(cfg)
    torch.testing.assert_close(inv, 1.0 / (1000.0 ** (torch.arange(0, 16, 2).float() / 16)) / 2.0)
    assert get_rope(cfg).cos_sin_cache.shape == (128, 16)  # linear scaling extends the cache like vLLM


def test_unknown_architecture():
    with pytest.raises(ValueError, match="not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_unknown_architecture_in_config(tmp_path):
    path = make_tiny_model(tmp_path, "llama", with_tokenizer=False)
    import json
    cfg_path = f"{path}/config.json"
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["FancyForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="FancyForCausalLM.*supported architectures"):
        resolve_model(ModelConfig(model=path), LoadConfig(), device="cpu")


def _fresh_model(path):
    info = resolve_model(ModelConfig(model=path), LoadConfig(), device="cpu")
    return get_model_class(info.architecture)(info.hf_config, AttentionContext(TorchAttentionBackend()))


def test_missing_tensor_error(tiny_qwen2_path):
    model = _fresh_model(tiny_qwen2_path)
    weights = [(n, t) for n, t in checkpoint_weights(tiny_qwen2_path) if n != "model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(WeightLoadError, match=r"missing 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        model.load_weights(weights)


def test_shape_mismatch_error(tiny_llama_path):
    model = _fresh_model(tiny_llama_path)
    weights = dict(checkpoint_weights(tiny_llama_path))
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(100, 64\).*\(128, 64\)"):
        model.load_weights(weights.items())


def test_extra_tensors_ignored(tiny_qwen3_path):
    model = _fresh_model(tiny_qwen3_path)
    weights = list(checkpoint_weights(tiny_qwen3_path))
    weights.append(("model.rotary_emb.inv_freq", torch.zeros(8)))
    model.load_weights(weights)  # no error


class _CausalOneSeqBackend:
    """Minimal backend for a compile check: one sequence, causal SDPA, through an opaque custom op (as compile/ will
    register the real attention), so Dynamo traces only our model code."""
    name = "test"

    def forward(self, q, k, v, kv_cache, spec, meta):
        return torch.ops.vllm_lite_test.causal_attn(q, k, v, spec.scale)

    def forward_rope(self, *args):
        from vllm_lite.attention.backend import forward_rope_reference
        return forward_rope_reference(self, *args)


@torch.library.custom_op("vllm_lite_test::causal_attn", mutates_args=())
def _causal_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           is_causal=True, scale=scale)
    return out.transpose(0, 1).contiguous()


@_causal_attn.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)


def test_forward_compiles_without_graph_breaks(tiny_qwen3_path):
    model = _fresh_model(tiny_qwen3_path)
    ctx = model.model.layers[0].self_attn.attn.ctx
    ctx.backend = _CausalOneSeqBackend()
    ctx.kv_caches = [torch.empty(0)] * model.config.num_hidden_layers
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    for n in (5, 9):
        ids, pos = torch.randint(0, 300, (n,)), torch.arange(n)
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, pos), model(ids, pos))


def test_bfloat16_matches_transformers(tiny_qwen3_path):
    """HF numerics in bf16 too (fp32 RMSNorm statistics, cos/sin computed in fp32 and cast)."""
    from transformers import AutoModelForCausalLM

    info = resolve_model(ModelConfig(model=tiny_qwen3_path, dtype="bfloat16"), LoadConfig(), device="cpu")
    ctx = AttentionContext(TorchAttentionBackend())
    model = load_model(info, LoadConfig(), "cpu", ctx)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    got = prefill_logits(model, ctx, [PROMPTS[3]])[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen3_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = hf(torch.tensor([PROMPTS[3]])).logits[0].float()
    assert got.dtype == torch.bfloat16  # logits stay in the model's dtype; the sampler reads or upcasts them
    got = got.float()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_skinny_gemm_switch_is_fixed_at_model_construction(tiny_llama_path, monkeypatch):
    """load_model(kernels=KernelConfig) hands skinny_gemm to every projection at construction: with it on, they call
    the vllm_lite::skinny_linear op on the devices in Linear.skinny_devices (CUDA; the CPU here, patched), with it off
    they are plain nn.Linear; both give the same outputs. No config given: the environment's default."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vllm_lite.config import KernelConfig
    from vllm_lite.models.decoder import Linear

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    info = resolve_model(ModelConfig(model=tiny_llama_path), LoadConfig(), device="cpu")
    monkeypatch.setattr(Linear, "skinny_devices", ("cuda", "cpu"))
    outs = {}
    x = torch.randn(3, info.hf_config.hidden_size, generator=torch.Generator().manual_seed(0))
    for flag in (True, False):
        ctx = AttentionContext(TorchAttentionBackend())
        model = load_model(info, LoadConfig(), "cpu", ctx, kernels=KernelConfig(skinny_gemm=flag))
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert len(linears) == 4 * model.config.num_hidden_layers and all(m.skinny is flag for m in linears)
        with torch.no_grad(), Ops() as ops:
            outs[flag] = model.model.layers[0].mlp(x)
        assert ("vllm_lite.skinny_linear.default" in ops.names) is flag, ops.names
    torch.testing.assert_close(outs[True], outs[False])
    monkeypatch.setenv("VLLM_LITE_SKINNY_GEMM", "0")
    model = load_model(info, LoadConfig(), "cpu", AttentionContext(TorchAttentionBackend()))
    assert not any(m.skinny for m in model.modules() if isinstance(m, Linear))


def test_aux_hidden_states_match_transformers(tiny_qwen3_path):
    """With aux layers set, the forward also returns the residual stream entering those layers: transformers'
    hidden_states[i] (EAGLE-style heads read them); the final hidden state is unchanged."""
    from transformers import AutoModelForCausalLM
    from tiny_models import make_step_metadata

    model, ctx = _ours(tiny_qwen3_path)
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen3_path, dtype=torch.float32).eval()
    prompt = PROMPTS[3]
    meta, num_blocks = make_step_metadata([len(prompt)], 4)
    cfg = model.config
    shape = ctx.backend.kv_cache_shape(num_blocks, 4, cfg.num_key_value_heads, cfg.head_dim)
    ctx.kv_caches = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    ctx.set_step(meta)
    ids, pos = torch.tensor(prompt), torch.arange(len(prompt))
    with torch.no_grad():
        plain = model(ids, pos)
        model.set_aux_hidden_state_layers((0, 1))
        hidden, aux = model(ids, pos)
        want = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden, plain)
    assert len(aux) == 2
    for i in (0, 1):
        torch.testing.assert_close(aux[i], want[i][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        model.set_aux_hidden_state_layers((5,))
