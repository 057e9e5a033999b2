"""The model's own tokenizer and chat template, read from its folder (never from a hub)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from transformers import AutoTokenizer

from kvcake.model.config import ModelConfig


class Tokenizer:
    def __init__(self, folder: Path, config: ModelConfig):
        self._hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.stop_ids = frozenset(_stop_ids(folder, config, self._hf.eos_token_id))

    @property
    def has_chat_template(self) -> bool:
        return bool(self._hf.chat_template)

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._hf.decode(list(token_ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, ending where the assistant's reply starts."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        return self._hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _stop_ids(folder: Path, config: ModelConfig, tokenizer_eos: int | None) -> set[int]:
    ids = set(config.eos_token_ids)
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return ids
