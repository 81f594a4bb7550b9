"""Model implementations (plain nn.Modules over flat token batches) and the architecture registry."""
from vllm_lite.models.decoder import (DecoderForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
                                      WeightLoadError, check_tensor_parallel)
from vllm_lite.models.registry import (MODEL_REGISTRY, architecture_of, get_model_class,
                                       supported_architectures)

__all__ = ["DecoderForCausalLM", "LlamaForCausalLM", "MODEL_REGISTRY", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
           "WeightLoadError", "architecture_of", "check_tensor_parallel", "get_model_class", "supported_architectures"]
