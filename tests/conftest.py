from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from live import LiveServer  # noqa: E402
from tiny import FAMILY_CONFIGS, TEST_DEVICE, save_tiny_model  # noqa: E402

from kvcake.config import KvcakeConfig, load_config  # noqa: E402
from kvcake.engine import Engine  # noqa: E402
from kvcake.model import DEFAULT_MODEL, ModelConfig, Tokenizer, Transformer, build_cpu_attention, resolve_model  # noqa: E402


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """CPU unless KVCAKE_TEST_DEVICE says otherwise (the GPU check runs the tiny-model tests on cuda)."""
    return torch.device(TEST_DEVICE)


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_model(family, root / family) for family in FAMILY_CONFIGS}


@pytest.fixture(scope="session")
def default_config() -> KvcakeConfig:
    """The real default model, converted once into the user cache (as the README's commands do)."""
    return load_config(overrides={"model": DEFAULT_MODEL, "device": "cpu", "dtype": "float32", "store_url": "memory://?max_gb=2"})


@pytest.fixture(scope="session", autouse=True)
def cpu_attention_kernel(default_config: KvcakeConfig) -> bool:
    """The CPU attention kernel, loaded for every test as `load_model` loads it for a float32 model on a CPU (the
    tests that build a `Transformer` themselves would otherwise run SDPA until some test loaded a model)."""
    return build_cpu_attention(default_config.cache_path())


@pytest.fixture(scope="session")
def default_folder(default_config: KvcakeConfig) -> Path:
    return resolve_model(default_config.model, default_config.cache_path())


@pytest.fixture(scope="session")
def default_model(default_folder: Path) -> Transformer:
    return Transformer.from_folder(default_folder)


@pytest.fixture(scope="session")
def default_tokenizer(default_folder: Path) -> Tokenizer:
    return Tokenizer(default_folder, ModelConfig.from_folder(default_folder))


@pytest.fixture(scope="session")
def hf_default_model(default_folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()


@pytest.fixture()
def config(tiny_folders: dict[str, Path], tmp_path: Path) -> KvcakeConfig:
    """The tiny llama with 32-token chunks and an in-memory store: what the server tests serve."""
    return KvcakeConfig(model=str(tiny_folders["llama"]), device=TEST_DEVICE, dtype="float32", chunk_size=32, store_url="memory://", cache_dir=str(tmp_path), max_tokens=8)


@pytest.fixture()
def live(config: KvcakeConfig) -> Iterator[LiveServer]:
    engine = Engine(config)
    with LiveServer(engine) as server:
        yield server
    engine.close()
