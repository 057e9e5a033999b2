"""Tiny random-weight checkpoints of each supported family, saved as real HF folders."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Paris is the capital of France; Berlin is the capital of Germany. " * 4,
    "KV caches make the first token arrive sooner when documents repeat. " * 4,
]

TEST_DEVICE = os.environ.get("KVCAKE_TEST_DEVICE", "cpu")
"""Where the tiny-model tests run: cpu unless KVCAKE_TEST_DEVICE names another (the GPU check sets cuda)."""

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILY_CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=True),
    "llama3-rope": lambda: LlamaConfig(
        **COMMON,
        rope_scaling={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        attention_bias=True,
    ),
    "qwen2": lambda: Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**COMMON, rope_theta=10000.0, sliding_window=None, head_dim=24),
}


def save_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family](), dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # Layer norm gains at 1, as in trained models: gains near 0 flatten attention, and a token at a
            # wrong position would then move the logits by ~1e-5, under the tests' tolerances. The final
            # norm's gains are random, so a tied head does not just predict the token it was fed.
            if name == "model.norm.weight":
                parameter.normal_(0.0, 1.0)
            elif "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def save_tiny_tokenizer(folder: Path) -> None:
    """A byte-level BPE of 512 tokens with chat markers (ids 0-2 special), trained on a few lines."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
