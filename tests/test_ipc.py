"""IPC messages: the model description the worker sends at start-up survives the trip and rebuilds the ModelInfo."""
from __future__ import annotations

import torch

from vllm_lite.config import LoadConfig, ModelConfig
from vllm_lite.model_loader import ModelInfo, resolve_model
from vllm_lite.protocol import (CORE_EVENT_DECODER, WORKER_EVENT_DECODER, ModelDescription, ModelError,
                                describe_model, encode)


def test_model_description_round_trip(tiny_qwen3_path):
    config = ModelConfig(model=tiny_qwen3_path, max_model_len=100, dtype="bfloat16")
    info = resolve_model(config, LoadConfig(), device="cpu")
    frame = encode(describe_model(info))
    desc = WORKER_EVENT_DECODER.decode(frame)
    assert isinstance(desc, ModelDescription) and CORE_EVENT_DECODER.decode(frame) == desc  # passed on as is
    assert (desc.path, desc.max_model_len, desc.dtype_name, desc.vocab_size) == (info.path, 100, "bfloat16",
                                                                             info.vocab_size)
    back = ModelInfo.from_description(desc)
    assert describe_model(back) == desc and back.dtype is torch.bfloat16
    assert type(desc) is ModelDescription  # the parsed config never travels
    assert back.hf_config.to_dict() == info.hf_config.to_dict()


def test_model_error_decodes_on_both_sockets():
    frame = encode(ModelError("ValueError: model 'x' has no config.json"))
    assert WORKER_EVENT_DECODER.decode(frame) == CORE_EVENT_DECODER.decode(frame) == ModelError(
        "ValueError: model 'x' has no config.json")
