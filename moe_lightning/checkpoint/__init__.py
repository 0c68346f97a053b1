"""Checkpoints of expert-parallel runs: sharded save, resharding load, consolidated export."""

from moe_lightning.checkpoint.resharding import consolidate, export_consolidated, load_for_rank

__all__ = ["consolidate", "export_consolidated", "load_for_rank"]
