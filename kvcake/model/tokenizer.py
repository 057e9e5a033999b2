"""The model's own tokenizer and chat template, read from its folder (never from a hub)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer

from kvcake.model.config import ModelConfig
from kvcake.model.grammar import grammar_tokenizer


class Tokenizer:
    def __init__(self, folder: Path, config: ModelConfig):
        self._hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.stop_ids = frozenset(_stop_ids(folder, config, self._hf.eos_token_id))

    @property
    def has_chat_template(self) -> bool:
        return bool(self._hf.chat_template)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """No token stands for more characters than this (the longest vocabulary entry), so a text of
        n characters has at least n / max_token_chars tokens: a cheap bound before tokenizing."""
        return max(1, *(len(token) for token in self._hf.get_vocab()))

    @functools.cached_property
    def grammar_tokenizer(self) -> object:
        """This vocabulary as the grammar engine sees it (built once: ~0.3 s)."""
        return grammar_tokenizer(self._hf)

    def stream_decoder(self) -> TextStream:
        return TextStream(self._hf.backend_tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._hf.decode(list(token_ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for a conversation, ending where the assistant's reply starts."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        return self._hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class TextStream:
    """Incremental detokenization: each token's new text in O(1), holding back incomplete characters."""

    def __init__(self, backend: BackendTokenizer):
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []

    def add(self, token_id: int) -> str:
        """The text this token completes ("" while a character is still incomplete)."""
        text = self._stream.step(self._backend, token_id) or ""
        self._held = [] if text else [*self._held, token_id]
        return text

    def finish(self) -> str:
        """The text of the tokens still held back once generation has ended: bytes that completed no
        character come out as replacement characters, as a whole decode of the answer gives them."""
        held, self._held = self._held, []
        return self._backend.decode(held, skip_special_tokens=True) if held else ""


def _stop_ids(folder: Path, config: ModelConfig, tokenizer_eos: int | None) -> set[int]:
    ids = set(config.eos_token_ids)
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return ids
