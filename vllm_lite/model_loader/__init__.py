"""Model resolution (local folder, GGUF, default model, hub id) and weight loading."""
from vllm_lite.model_loader.default_model import INSTALL_COMMAND, default_gguf_path, is_default_model
from vllm_lite.model_loader.gguf_loader import convert_gguf
from vllm_lite.model_loader.loader import load_model
from vllm_lite.model_loader.resolve import ModelInfo, resolve_model

__all__ = ["INSTALL_COMMAND", "ModelInfo", "convert_gguf", "default_gguf_path", "is_default_model", "load_model",
           "resolve_model"]
