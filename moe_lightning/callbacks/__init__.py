"""Lightning callbacks over the routings ``training_step`` returns (statistics, traces, alarms and capacity tuning),
and a crash-safe ModelCheckpoint."""

from moe_lightning.callbacks.alarms import AlarmRule, RoutingAlarms
from moe_lightning.callbacks.capacity_tuner import CapacityAutoTuner
from moe_lightning.callbacks.collapse_guard import ExpertCollapseGuard
from moe_lightning.callbacks.crash_safe_checkpoint import CrashSafeCheckpoint
from moe_lightning.callbacks.stats_monitor import RouterStatsMonitor
from moe_lightning.callbacks.trace_writer import RoutingTraceWriter

__all__ = [
    "AlarmRule", "CapacityAutoTuner", "CrashSafeCheckpoint", "ExpertCollapseGuard", "RouterStatsMonitor",
    "RoutingAlarms", "RoutingTraceWriter",
]
