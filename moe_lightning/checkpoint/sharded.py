"""Expert-sharded Lightning checkpoints that reload at any expert-parallel size.

A checkpoint is a directory:

- ``meta.pt``: the ordinary Lightning checkpoint dict without the expert tensors (dense weights, dense
  optimizer state, loops, schedulers, hyper-parameters), plus ``"expert_parallel"`` saying which tensors
  were taken out; written by global rank 0. Dense tensors are whole even when the run sharded them
  (``dense_parallel="fully_shard"``: see :mod:`moe_lightning.checkpoint.dtensors`), so the format does not
  depend on the dense layout.
- ``experts-{p}-of-{P}.safetensors``: expert-parallel rank ``p``'s slice (dim 0) of every expert weight
  and of its optimizer moments, written by one replica of that rank.

- ``manifest.json``: every other file's size and SHA-256 (:mod:`moe_lightning.checkpoint.integrity`), written
  last. The directory is assembled under a hidden ``.NAME.partial`` name and renamed to its own name only once the
  manifest is written (:mod:`moe_lightning.checkpoint.atomic`), so a directory without one is incomplete.

Expert tensors are keyed ``model/<state_dict key>`` and ``optimizer<i>/<param name>/<state key>``:
optimizer state is keyed by parameter *name*, so it survives a change of parallel layout.

Shape legend: E experts (global), P expert-parallel ranks of the saved run, e = E / P.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moe_lightning.checkpoint.atomic import partial_path, publish_directory, remove
from moe_lightning.checkpoint.integrity import DIRECTORY_MANIFEST, write_manifest

META_FILE = "meta.pt"
INFO_KEY = "expert_parallel"
_SHARD_PATTERN = re.compile(r"experts-(\d+)-of-(\d+)\.safetensors")


def shard_file_name(ep_rank: int, ep_size: int) -> str:
    return f"experts-{ep_rank:05d}-of-{ep_size:05d}.safetensors"


def split_expert_tensors(
    checkpoint: dict[str, Any], expert_names: list[str], optimizer_param_names: list[list[str]]
) -> dict[str, Tensor]:
    """Pop the expert weights and their per-expert optimizer moments out of a Lightning checkpoint dict.

    ``optimizer_param_names[i][j]`` names parameter ``j`` of optimizer ``i`` in ``state_dict()`` order.
    Scalar state (Adam's ``step``) stays in the dict: it is the same for every expert.
    """
    experts = {f"model/{name}": checkpoint["state_dict"].pop(name) for name in expert_names}
    expert_set = set(expert_names)
    for i, (optimizer_state, names) in enumerate(zip(checkpoint.get("optimizer_states", []), optimizer_param_names)):
        for param_id, param_state in list(optimizer_state["state"].items()):
            if names[param_id] not in expert_set:
                continue
            # Optimizer.state_dict() shares these dicts with the live optimizer: pop from a copy.
            param_state = optimizer_state["state"][param_id] = dict(param_state)
            for key in [k for k, v in param_state.items() if isinstance(v, Tensor) and v.dim() > 0]:
                experts[f"optimizer{i}/{names[param_id]}/{key}"] = param_state.pop(key)
    return experts


def merge_expert_tensors(
    checkpoint: dict[str, Any], experts: dict[str, Tensor], optimizer_param_names: list[list[str]]
) -> None:
    """The inverse of :func:`split_expert_tensors`."""
    for i, names in enumerate(optimizer_param_names):
        param_ids = {name: param_id for param_id, name in enumerate(names)}
        for key, value in experts.items():
            kind, _, rest = key.partition("/")
            if kind == f"optimizer{i}":
                name, _, state_key = rest.rpartition("/")
                checkpoint["optimizer_states"][i]["state"][param_ids[name]][state_key] = value
    for key, value in experts.items():
        if key.startswith("model/"):
            checkpoint["state_dict"][key.removeprefix("model/")] = value


def local_slice(full_E: Tensor, ep_rank: int, ep_size: int, key: str = "") -> Tensor:
    """Rows ``[p * E / P, (p + 1) * E / P)`` of a tensor holding all experts."""
    if full_E.shape[0] % ep_size != 0:
        raise ValueError(
            f"cannot split {key or 'expert tensor'} with {full_E.shape[0]} experts over expert_parallel_size={ep_size}"
        )
    size = full_E.shape[0] // ep_size
    return full_E[ep_rank * size : (ep_rank + 1) * size]


def save_sharded(
    path: Path, checkpoint: dict[str, Any], experts: dict[str, Tensor], info: dict[str, Any],
    ep_rank: int, ep_size: int, write_meta: bool, write_experts: bool,
) -> None:
    """Write this rank's part of a sharded checkpoint; the directory must already exist (empty)."""
    if write_meta:
        torch.save({**checkpoint, INFO_KEY: {**info, "ep_size": ep_size, "expert_keys": sorted(experts)}}, path / META_FILE)
    if write_experts:
        tensors = {key: value.detach().cpu().contiguous() for key, value in experts.items()}
        metadata = {"ep_rank": str(ep_rank), "ep_size": str(ep_size)}
        save_file(tensors, path / shard_file_name(ep_rank, ep_size), metadata=metadata)


def begin_directory(target: Path) -> Path:
    """An empty directory to assemble the checkpoint ``target`` in (a stale one of an interrupted write is
    cleared); call on one rank, then let every rank :func:`save_sharded` into it."""
    partial = partial_path(target)
    remove(partial)
    partial.mkdir(parents=True)
    return partial


def finish_directory(partial: Path, target: Path) -> None:
    """Once every rank's files are in ``partial``: write its manifest, then rename it to ``target`` (one rank)."""
    write_manifest(partial)
    publish_directory(partial, target)


def load_sharded(path: Path, ep_rank: int, ep_size: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a sharded checkpoint for rank ``ep_rank`` of ``ep_size``: the dict without experts, and this rank's
    slice of every expert tensor (``ep_size=1`` consolidates). Refuses incomplete or ambiguous shard sets."""
    if not (path / DIRECTORY_MANIFEST).is_file():
        raise ValueError(
            f"checkpoint {path} is incomplete: it has no {DIRECTORY_MANIFEST}, which a sharded checkpoint writes "
            f"last (its write was interrupted, or it was written before checkpoints had manifests: then "
            f"moe_lightning.checkpoint.integrity.write_manifest({str(path)!r}) marks it complete)"
        )
    checkpoint = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    info = checkpoint[INFO_KEY]
    shards = _check_shards(path, info["ep_size"], info["expert_keys"])
    experts = {key: _read_rows(shards, key, ep_rank, ep_size) for key in info["expert_keys"]}
    return checkpoint, experts


def _check_shards(path: Path, saved_ep_size: int, expert_keys: list[str]) -> list[Path]:
    found: dict[int, list[Path]] = {}
    for file in sorted(path.glob("experts-*.safetensors")):
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
        if int(meta.get("ep_size", -1)) != saved_ep_size:
            raise ValueError(f"expert shard {file} belongs to a run with ep_size={meta.get('ep_size')}, not {saved_ep_size}")
        absent = sorted(set(expert_keys) - keys)
        if absent:
            raise ValueError(f"expert shard {file} lacks {len(absent)} tensor(s): {absent[:5]}")
        found.setdefault(int(meta["ep_rank"]), []).append(file)
    duplicated = {rank: [f.name for f in files] for rank, files in found.items() if len(files) > 1}
    if duplicated:
        raise ValueError(f"checkpoint {path} has duplicated expert shards (ep_rank: files): {duplicated}")
    missing = [rank for rank in range(saved_ep_size) if rank not in found]
    if missing:
        raise ValueError(
            f"checkpoint {path} is missing expert shard(s) {missing} of {saved_ep_size} "
            f"(files {[shard_file_name(r, saved_ep_size) for r in missing]}): the experts of those ranks would be "
            f"lost; found {sorted(f.name for files in found.values() for f in files)}"
        )
    return [found[rank][0] for rank in range(saved_ep_size)]


def _read_rows(shards: list[Path], key: str, ep_rank: int, ep_size: int) -> Tensor:
    """Assemble rows ``[p * E / P, (p + 1) * E / P)`` of ``key`` from the saved shards that overlap them."""
    pieces, offset = [], 0
    for file in shards:
        with safe_open(file, "pt") as f:
            rows = f.get_slice(key)
            saved_e = rows.get_shape()[0]
            if offset == 0:
                total_E = saved_e * len(shards)
                if total_E % ep_size != 0:
                    raise ValueError(f"cannot split {key} with {total_E} experts over expert_parallel_size={ep_size}")
                start, stop = ep_rank * total_E // ep_size, (ep_rank + 1) * total_E // ep_size
            lo, hi = max(start, offset), min(stop, offset + saved_e)
            if lo < hi:
                pieces.append(rows[lo - offset : hi - offset])
            offset += saved_e
    return torch.cat(pieces)
