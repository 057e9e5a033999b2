"""Which tokens of reused documents are recomputed: CacheBlend selection, CacheTune scores and ratio."""

from kvcake.blend.prefetch import LayerKV, LayerPrefetcher, LayerSource
from kvcake.blend.scores import RULES, token_scores
from kvcake.blend.selective import BlendFallback, BlendPrefill, BlendReport, kept_fractions
from kvcake.blend.tune import TuneProfile, order_entry, order_from_entry

__all__ = ["RULES", "TuneProfile", "order_entry", "order_from_entry", "token_scores", "BlendFallback", "BlendPrefill", "BlendReport", "LayerKV", "LayerPrefetcher", "LayerSource", "kept_fractions"]
