"""Checkpoint readers (single / sharded safetensors, PyTorch .bin) and deterministic dummy weights.

Readers are generators of (HF name, CPU tensor) so that a model's `load_weights` copies one tensor at a time and a
large checkpoint never sits in host memory twice. Progress goes to the "vllm_lite.model_loader" logger per shard.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

import torch
from torch import nn

logger = logging.getLogger("vllm_lite.model_loader")

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _shards_from_index(folder: str, index_name: str) -> list[str]:
    with open(os.path.join(folder, index_name)) as f:
        weight_map = json.load(f)["weight_map"]
    return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]


def find_safetensors(folder: str) -> list[str]:
    """Shard files of a folder: the index's files when there is an index, else every *.safetensors file."""
    if os.path.exists(os.path.join(folder, SAFETENSORS_INDEX)):
        return _shards_from_index(folder, SAFETENSORS_INDEX)
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def find_bin_files(folder: str) -> list[str]:
    if os.path.exists(os.path.join(folder, BIN_INDEX)):
        return _shards_from_index(folder, BIN_INDEX)
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.endswith(".bin") and n.startswith("pytorch_model"))


def _progress(i: int, n: int, path: str, count: int, nbytes: int, t0: float) -> None:
    logger.info("loaded shard %d/%d %s: %d tensors, %.1f MB (%.1fs elapsed)", i, n, os.path.basename(path), count,
                nbytes / 2**20, time.perf_counter() - t0)


def iterate_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    t0 = time.perf_counter()
    for i, path in enumerate(files, 1):
        count = nbytes = 0
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                count += 1
                nbytes += tensor.numel() * tensor.element_size()
                yield name, tensor
        _progress(i, len(files), path, count, nbytes, t0)


def iterate_bin(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """PyTorch checkpoints, loaded with weights_only=True (no arbitrary unpickling)."""
    t0 = time.perf_counter()
    for i, path in enumerate(files, 1):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        yield from state.items()
        _progress(i, len(files), path, len(state), nbytes, t0)
        del state


def checkpoint_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors of an HF-layout folder, preferring safetensors; a folder without weights is a clear error."""
    files = find_safetensors(folder)
    if files:
        return iterate_safetensors(files)
    files = find_bin_files(folder)
    if files:
        return iterate_bin(files)
    raise FileNotFoundError(f"no weights (*.safetensors or pytorch_model*.bin) in {folder}; "
                            f"use load_format='dummy' for random weights")


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights for benchmarks: matrices ~ N(0, std), biases 0, norm weights left at 1.

    A generator on the parameters' device makes the weights deterministic per (seed, device) without a host copy.
    """
    gens: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            gen = gens.get(param.device)
            if gen is None:
                gen = gens[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.normal_(0.0, std, generator=gen)
        elif name.endswith("bias"):
            param.zero_()
