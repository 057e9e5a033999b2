"""Save a random-weight model folder of a real shape with qwen2.5's tokenizer, for TTFT benchmarks
on a machine that cannot get the real weights (the answers are noise; the work per token is real).

    python3 scripts/random_model.py TOKENIZER_FOLDER TARGET_FOLDER {qwen2.5-0.5b,qwen2.5-7b}
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def main(source: Path, target: Path, shape: str) -> None:
    fields = json.loads((source / "config.json").read_text())
    if shape == "qwen2.5-7b":
        fields.update(QWEN_7B, layer_types=["full_attention"] * QWEN_7B["num_hidden_layers"])
    elif shape != "qwen2.5-0.5b":
        raise SystemExit(f"unknown shape {shape!r}")
    fields = {name: value for name, value in fields.items() if not name.startswith("_") and name not in ("transformers_version", "architectures")}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.02)
    model.save_pretrained(target)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, target / name)
    print(f"saved {target}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
