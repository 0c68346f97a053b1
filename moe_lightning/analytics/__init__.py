"""Routing statistics as plain functions over :class:`Routing` objects (no Lightning inside)."""

from moe_lightning.analytics.summary import LayerSummary, summarize_routings

__all__ = ["LayerSummary", "summarize_routings"]
