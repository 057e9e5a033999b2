"""When each chunk is computed or loaded (compute-only, load-only, Cake, static split)."""

from kvcake.schedule.prefix import STRATEGIES, ChunkLoader, CostProfile, PrefixPrefill, PrefixReport, Strategy
from kvcake.schedule.writeback import WriteBack

__all__ = ["STRATEGIES", "ChunkLoader", "CostProfile", "PrefixPrefill", "PrefixReport", "Strategy", "WriteBack"]
