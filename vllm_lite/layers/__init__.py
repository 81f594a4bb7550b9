"""Model building blocks shared by the decoder models: RMSNorm, SiLU-and-mul, rotary embeddings."""
from vllm_lite.layers.activation import SiluAndMul
from vllm_lite.layers.norm import RMSNorm
from vllm_lite.layers.rotary import RotaryEmbedding, compute_inv_freq, get_rope, max_rope_positions, rope_parameters

__all__ = ["RMSNorm", "RotaryEmbedding", "SiluAndMul", "compute_inv_freq", "get_rope", "max_rope_positions",
           "rope_parameters"]
