"""Offline token scores (CacheTune): which tokens of a document to recompute, decided when it is stored.

For every layer, each token's K (before RoPE) and V over all heads form one feature
vector; an FFT along the token axis keeps the lowest `keep` fraction of frequencies and
the inverse FFT gives the smooth part of the sequence. Rules:

- `highpass` (default): the energy of what the smooth part misses, i.e. how much a
  token stands out from its neighbours. Tokens like the document's first ones, names and
  numbers carry this high-frequency content, and their KV is what attention to an
  unseen context changes most.
- `lowpass`: the energy of the smooth part itself (a control).
- `norm`: the plain K/V energy, no frequency analysis (a control).

Each layer's scores are divided by their mean, so every layer weighs the same, then
averaged over layers. Only the order of the scores matters.
"""

from __future__ import annotations

import math

import torch

RULES = ("highpass", "lowpass", "norm")


def token_scores(keys: list[torch.Tensor], values: list[torch.Tensor], rule: str = "highpass", keep: float = 0.1) -> torch.Tensor:
    """Scores (num_tokens,) from per-layer K and V shaped (Hkv, T, d); higher = recompute first."""
    if rule not in RULES:
        raise ValueError(f"unknown scoring rule {rule!r}; known: {', '.join(RULES)}")
    per_layer = [_layer_scores(k, v, rule, keep) for k, v in zip(keys, values)]
    return torch.stack(per_layer).mean(dim=0)


def _layer_scores(keys: torch.Tensor, values: torch.Tensor, rule: str, keep: float) -> torch.Tensor:
    num_tokens = keys.shape[1]
    features = torch.cat([keys.transpose(0, 1).reshape(num_tokens, -1), values.transpose(0, 1).reshape(num_tokens, -1)], dim=1).float()
    if rule == "norm":
        energy = features.pow(2).sum(dim=1)
    else:
        spectrum = torch.fft.rfft(features, dim=0)
        spectrum[max(1, math.ceil(keep * spectrum.shape[0])) :] = 0
        smooth = torch.fft.irfft(spectrum, n=num_tokens, dim=0)
        energy = (features - smooth if rule == "highpass" else smooth).pow(2).sum(dim=1)
    return energy / energy.mean().clamp_min(1e-12)
