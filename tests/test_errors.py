"""Bad input is refused with an error that names its cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import save_tiny_model

from kvcake.config import KvcakeConfig
from kvcake.engine import Engine
from kvcake.requests import GenerateRequest, RequestError
from kvcake.model import ModelConfig, SamplingParams, UnknownModelError, UnsupportedArchitectureError, load_model


def _edited_checkpoint(source: Path, target: Path, **changes: object) -> Path:
    save_tiny_model("llama", target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"model_type": "mistral", "sliding_window": 1024}, "sliding-window attention"),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"kv_lora_rank": 512}, "multi-head latent attention"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope scaling type 'yarn'"),
        ({"hidden_act": "gelu"}, "activation 'gelu'"),
        ({"layer_types": ["sliding_attention", "full_attention", "full_attention"], "sliding_window": 64}, "sliding-window"),
    ],
)
def test_unsupported_architecture_is_refused_at_load(tmp_path: Path, changes: dict, reason: str) -> None:
    folder = _edited_checkpoint(tmp_path, tmp_path / "model", **changes)
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        load_model(str(folder), tmp_path / "cache", *_cpu())


def test_sliding_window_wider_than_the_context_is_accepted() -> None:
    config = ModelConfig.from_hf(
        {"model_type": "mistral", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "max_position_embeddings": 4096, "sliding_window": 4096}
    )
    assert config.family == "mistral"


def test_unknown_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'"):
        load_model("no-such-model", tmp_path, *_cpu())


def test_bad_requests_name_their_cause(tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    engine = Engine(KvcakeConfig(model=str(tiny_folders["llama"]), device="cpu", dtype="float32", cache_dir=str(tmp_path)))
    with pytest.raises(RequestError, match="exactly one of"):
        engine.generate(GenerateRequest())
    with pytest.raises(RequestError, match="token ids must lie in"):
        engine.generate(GenerateRequest(token_ids=[1, 99999]))
    with pytest.raises(RequestError, match="context is 4096"):
        engine.generate(GenerateRequest(token_ids=[5] * 4096))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert engine.generate(GenerateRequest(token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=3))).token_ids


def _cpu():
    import torch

    return torch.device("cpu"), torch.float32
