"""Live web dashboard of the records :class:`RouterStatsMonitor` appends to ``router_stats.jsonl`` while training runs,
and of the alarms :class:`RoutingAlarms` appends to ``alarms.jsonl``.

``moe-lightning dashboard RUN_DIR`` serves it; needs the ``dashboard`` extra (FastAPI, uvicorn, websockets).
"""

from moe_lightning.dashboard.tail import StatsTail

__all__ = ["StatsTail"]
