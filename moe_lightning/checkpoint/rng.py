"""The random number generators' states of every rank, in a form ``torch.load(weights_only=True)`` reads back.

Lightning's checkpoints hold no RNG state, so a resumed run would draw other router jitter, dropout or sampling
noise than the run it continues. :func:`gather_rng_states` collects torch's (CPU and CUDA), NumPy's and Python's
generators of each process, indexed by global rank; :func:`restore_rng_states` sets this process's own.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def rng_states() -> dict[str, Any]:
    """This process's generator states, as tensors, ints and tuples only (NumPy's key array becomes a tensor)."""
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    key = numpy["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every process's :func:`rng_states`, by global rank (a collective call when a process group exists)."""
    own = rng_states()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return gathered


def restore_rng_states(saved: list[dict[str, Any]], rank: int, world_size: int) -> bool:
    """Set this process's generators from ``saved`` (:func:`gather_rng_states` of the saving run); returns False,
    changing nothing, when that run had another world size (its ranks' streams do not map onto this run's)."""
    if len(saved) != world_size:
        return False
    set_rng_states(saved[rank])
    return True
