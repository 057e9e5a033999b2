"""When each prefix chunk is computed or loaded, and the contract every reuse strategy keeps."""

from kvcake.schedule.contract import BlendReport, Filled, Reuse, ReuseChoice
from kvcake.schedule.prefetch import ByteBudget, PrefixPrefetch
from kvcake.schedule.prefix import STRATEGIES, WAIT_S, WAITING, ChunkLoader, CostProfile, PrefixPrefill, PrefixReport, Strategy, Waiting, drain
from kvcake.schedule.reuse import PrefixPlan, PrefixReuse
from kvcake.schedule.writeback import WriteBack

__all__ = [
    "WAITING",
    "WAIT_S",
    "Waiting",
    "STRATEGIES",
    "BlendReport",
    "ByteBudget",
    "ChunkLoader",
    "CostProfile",
    "Filled",
    "PrefixPlan",
    "PrefixPrefetch",
    "PrefixPrefill",
    "PrefixReport",
    "PrefixReuse",
    "Reuse",
    "ReuseChoice",
    "Strategy",
    "WriteBack",
    "drain",
]
