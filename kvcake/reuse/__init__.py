"""Every way kvcake obtains a prompt's KV, one file per mechanism behind one contract.

| file | holds |
|---|---|
| `contract.py` | the `Reuse` protocol every strategy keeps, `ReuseChoice`, the reports, `Filled` |
| `routing.py` | mode parsing, `route`, and the classes of `kvcake.modes`' document rows |
| `prefix.py` | `PrefixReuse`: a prompt's exact prefix (chunks and tail blocks), the rest computed, write-back queued |
| `cake.py` | when each prefix chunk is computed or loaded: compute, load, Cake, split:M |
| `documents.py` | `DocumentReuse`: documents stored once, placed anywhere (shared by blend and tune) |
| `blend.py` | `BlendReuse`: CacheBlend |
| `selective.py` | `BlendPrefill`: the layer-wise selective recompute blend and tune run |
| `tune.py` | `TuneReuse`: CacheTune's stored order and adaptive ratio |
| `scores.py` | CacheTune's offline token scores |
| `layers.py` | documents' stored layers loaded ahead on threads |
| `prefetch.py` | a waiting request's stored prefix loaded ahead |
| `writeback.py` | computed entries written to the store off the request's path |
| `inflight.py` | keys some request is computing now, so identical work runs once |
"""

from kvcake.reuse.blend import BlendReuse
from kvcake.reuse.cake import WAIT_S, WAITING, ChunkLoader, CostProfile, PrefixPrefill, PrefixReport, Strategy, Waiting, drain
from kvcake.reuse.contract import ALONE, ALONE_PASS_TOKENS, PACE, PREFIX, Alone, DocumentReport, Filled, Pace, Reuse, ReuseChoice
from kvcake.reuse.documents import DocumentPlan, DocumentReuse, DocumentRows, DocumentSettings
from kvcake.reuse.layers import LayerPrefetcher, LayerSource
from kvcake.reuse.prefetch import ByteBudget, PrefixPrefetch
from kvcake.reuse.prefix import PrefixPlan, PrefixReuse
from kvcake.reuse.routing import BLEND, DOCUMENT_MODES, document_mode, document_strategies, parse_mode, route
from kvcake.reuse.scores import RULES, token_scores
from kvcake.reuse.selective import BlendFallback, BlendPrefill, kept_fractions, parse_check_layers
from kvcake.reuse.tune import ScoredDocument, TuneProfile, TuneReuse, order_entry, order_from_entry
from kvcake.reuse.writeback import WriteBack

__all__ = [
    "ALONE",
    "ALONE_PASS_TOKENS",
    "BLEND",
    "DOCUMENT_MODES",
    "PACE",
    "PREFIX",
    "document_mode",
    "document_strategies",
    "parse_mode",
    "route",
    "RULES",
    "WAITING",
    "WAIT_S",
    "Alone",
    "BlendFallback",
    "BlendPrefill",
    "DocumentReport",
    "BlendReuse",
    "ByteBudget",
    "ChunkLoader",
    "CostProfile",
    "DocumentPlan",
    "DocumentReuse",
    "DocumentRows",
    "DocumentSettings",
    "Filled",
    "LayerPrefetcher",
    "LayerSource",
    "Pace",
    "PrefixPlan",
    "PrefixPrefetch",
    "PrefixPrefill",
    "PrefixReport",
    "PrefixReuse",
    "Reuse",
    "ReuseChoice",
    "ScoredDocument",
    "Strategy",
    "TuneProfile",
    "TuneReuse",
    "Waiting",
    "WriteBack",
    "drain",
    "kept_fractions",
    "order_entry",
    "order_from_entry",
    "parse_check_layers",
    "token_scores",
]
