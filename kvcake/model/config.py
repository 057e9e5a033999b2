"""Typed model configuration read from a Hugging Face `config.json`.

Only architectures whose math the runner reproduces exactly are accepted; anything
else is refused here, at load, with an error that names the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint uses a feature the layer-wise runner cannot serve correctly."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        family = hf.get("model_type", "")
        if family not in SUPPORTED_FAMILIES:
            raise UnsupportedArchitectureError(
                f"model_type {family!r} is not supported: kvcake serves {', '.join(SUPPORTED_FAMILIES)} "
                "(decoder-only, RoPE, full attention)"
            )
        _refuse_unservable_features(hf)
        num_heads = int(hf["num_attention_heads"])
        hidden_size = int(hf["hidden_size"])
        return cls(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope=_rope_config(hf),
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        return cls.from_hf(json.loads((folder / "config.json").read_text()))


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _refuse_unservable_features(hf: Mapping[str, Any]) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"activation {hf['hidden_act']!r} is not supported (only silu/SwiGLU)")
    if hf.get("kv_lora_rank") or hf.get("q_lora_rank"):
        raise UnsupportedArchitectureError("multi-head latent attention (MLA) is not supported")
    if hf.get("num_local_experts") or hf.get("num_experts"):
        raise UnsupportedArchitectureError("mixture-of-experts layers are not supported")
    if hf.get("position_embedding_type", "rope") != "rope" or hf.get("no_rope_layers"):
        raise UnsupportedArchitectureError("models without RoPE on every layer are not supported")
    _refuse_sliding_window(hf)


def _refuse_sliding_window(hf: Mapping[str, Any]) -> None:
    """A sliding window that can bind changes attention; one wider than the context never does."""
    window = hf.get("sliding_window")
    active = hf.get("use_sliding_window", hf.get("model_type") == "mistral")
    layer_types = hf.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        active = True
    if active and window is not None and int(window) < int(hf.get("max_position_embeddings", 0)):
        raise UnsupportedArchitectureError(
            f"sliding-window attention (window {window} < context {hf.get('max_position_embeddings')}) "
            "is not supported: stored KV chunks assume full attention"
        )


def _rope_config(hf: Mapping[str, Any]) -> RopeConfig:
    """Read RoPE settings from either the v5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError("partial rotary embeddings are not supported")
    factor = float(params.get("factor", 1.0))
    if rope_type != "default" and not (math.isfinite(factor) and factor > 0):
        raise UnsupportedArchitectureError(f"rope scaling factor {factor!r} is invalid")
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
