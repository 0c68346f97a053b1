"""Dispatchers move routed rows to their experts and back."""

from moe_lightning.dispatch.all_to_all import AllToAllDispatcher, AllToAllState
from moe_lightning.dispatch.local import DispatchState, FixedKDispatchState, LocalDispatcher

__all__ = ["AllToAllDispatcher", "AllToAllState", "DispatchState", "FixedKDispatchState", "LocalDispatcher"]
