"""Dispatchers move routed rows to their experts and back."""

from moe_lightning.dispatch.local import DispatchState, LocalDispatcher

__all__ = ["DispatchState", "LocalDispatcher"]
