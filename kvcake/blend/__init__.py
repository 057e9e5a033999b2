"""Which document tokens are recomputed: CacheBlend's selection, CacheTune's scores and ratio, and the document strategies."""

from kvcake.blend.documents import BlendReuse, DocumentPlan, DocumentReuse, DocumentSettings
from kvcake.blend.prefetch import LayerPrefetcher, LayerSource
from kvcake.blend.scores import RULES, token_scores
from kvcake.blend.selective import BlendFallback, BlendPrefill, kept_fractions, parse_check_layers
from kvcake.schedule import BlendReport
from kvcake.blend.tune import ScoredDocument, TuneProfile, TuneReuse, order_entry, order_from_entry

__all__ = [
    "RULES",
    "BlendFallback",
    "BlendPrefill",
    "BlendReport",
    "BlendReuse",
    "DocumentPlan",
    "DocumentReuse",
    "DocumentSettings",
    "LayerPrefetcher",
    "LayerSource",
    "ScoredDocument",
    "TuneProfile",
    "TuneReuse",
    "kept_fractions",
    "order_entry",
    "order_from_entry",
    "parse_check_layers",
    "token_scores",
]
