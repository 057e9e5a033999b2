"""Model math and weights: load a checkpoint and run it layer by layer."""

from __future__ import annotations

from pathlib import Path

import torch

from kvcake.model.config import ModelConfig, UnsupportedArchitectureError
from kvcake.model.cpu_kernels import build_cpu_attention
from kvcake.model.kv import CachePool, KVCache
from kvcake.model.registry import DEFAULT_MODEL, REGISTRY, UnknownModelError, resolve_model, weights_identity
from kvcake.model.sampling import Sampler, SamplingParams
from kvcake.model.tokenizer import Tokenizer
from kvcake.model.transformer import ForwardOutput, Transformer, native_bf16_cpu

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ForwardOutput",
    "CachePool",
    "KVCache",
    "ModelConfig",
    "Sampler",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "build_cpu_attention",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
    "weights_identity",
]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_bf16_cpu() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(model: str, cache_root: Path, device: torch.device, dtype: torch.dtype) -> tuple[Transformer, Tokenizer, Path]:
    """Resolve, check and load a model; unsupported architectures fail before any weight is read. A model on a CPU
    gets the CPU attention kernel (float32 and bfloat16), compiled into the cache dir on first use."""
    folder = resolve_model(model, cache_root)
    config = ModelConfig.from_folder(folder)
    if device.type == "cpu":
        build_cpu_attention(cache_root)
    return Transformer.from_folder(folder, device, dtype), Tokenizer(folder, config), folder
