"""Lightning callbacks over the routings ``training_step`` returns (statistics, traces and collapse guards), and a
crash-safe ModelCheckpoint."""

from moe_lightning.callbacks.collapse_guard import ExpertCollapseGuard
from moe_lightning.callbacks.crash_safe_checkpoint import CrashSafeCheckpoint
from moe_lightning.callbacks.stats_monitor import RouterStatsMonitor
from moe_lightning.callbacks.trace_writer import RoutingTraceWriter

__all__ = ["CrashSafeCheckpoint", "ExpertCollapseGuard", "RouterStatsMonitor", "RoutingTraceWriter"]
