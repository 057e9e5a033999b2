"""When each chunk is computed or loaded (compute-only, load-only, Cake, static split)."""

from kvcake.schedule.prefix import STRATEGIES, ChunkLoader, CostProfile, PrefixPrefill, PrefixReport, Strategy, drain
from kvcake.schedule.prefetch import ByteBudget, PrefixPrefetch
from kvcake.schedule.writeback import WriteBack

__all__ = ["ByteBudget", "PrefixPrefetch", "STRATEGIES", "ChunkLoader", "CostProfile", "PrefixPrefill", "PrefixReport", "Strategy", "WriteBack", "drain"]
