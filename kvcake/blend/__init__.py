"""Which tokens of reused documents are recomputed (CacheBlend selection)."""

from kvcake.blend.prefetch import LayerKV, LayerPrefetcher, LayerSource
from kvcake.blend.selective import BlendFallback, BlendPrefill, BlendReport, kept_fractions

__all__ = ["BlendFallback", "BlendPrefill", "BlendReport", "LayerKV", "LayerPrefetcher", "LayerSource", "kept_fractions"]
