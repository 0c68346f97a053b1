"""Read a checkpoint for any expert-parallel layout: sharded directories and consolidated single files alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_lightning.checkpoint.atomic import atomic_torch_save
from moe_lightning.checkpoint.sharded import INFO_KEY, load_sharded, local_slice, merge_expert_tensors, split_expert_tensors


def load_for_rank(path: str | Path, ep_rank: int, ep_size: int, own_info: dict[str, Any]) -> dict[str, Any]:
    """An ordinary Lightning checkpoint dict holding this rank's slice of every expert tensor.

    ``own_info`` (``expert_names`` and ``optimizer_param_names`` of the running model) describes files that
    do not describe themselves, e.g. a checkpoint written by a one-device run without this strategy.
    """
    path = Path(path)
    if path.is_dir():
        checkpoint, experts = load_sharded(path, ep_rank, ep_size)
        info = checkpoint.pop(INFO_KEY)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        info = checkpoint.pop(INFO_KEY, None) or own_info
        full = split_expert_tensors(checkpoint, info["expert_names"], info["optimizer_param_names"])
        experts = {key: local_slice(value, ep_rank, ep_size, key) for key, value in full.items()}
    merge_expert_tensors(checkpoint, experts, info["optimizer_param_names"])
    return checkpoint


def consolidate(path: str | Path) -> dict[str, Any]:
    """The checkpoint as one dict with every expert, loadable by any Lightning strategy (and by this one)."""
    checkpoint, experts = load_sharded(Path(path), ep_rank=0, ep_size=1)
    info = checkpoint.pop(INFO_KEY)
    merge_expert_tensors(checkpoint, experts, info["optimizer_param_names"])
    info = {"expert_names": info["expert_names"], "optimizer_param_names": info["optimizer_param_names"]}
    return {**checkpoint, INFO_KEY: info}


def export_consolidated(path: str | Path, output_file: str | Path) -> None:
    """Write :func:`consolidate` of the sharded checkpoint ``path`` to one ``torch.save`` file (atomically)."""
    atomic_torch_save(consolidate(path), output_file)
