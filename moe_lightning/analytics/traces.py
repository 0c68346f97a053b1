"""Routing traces: sampled routing rows with their token ids and labels, as compressed columnar ``.npz`` files.

One file per sampled step, ``step{step:09d}.npz``, holding equal-length columns (one entry per routed row):
``layer`` int16, ``token`` int32 (index of the token among the sampled ones), ``token_id`` int32, ``label``
int32 (-1 without labels), ``expert`` int16, ``weight`` float32; and the scalar ``step``. NumPy only, so the
files open anywhere without this package: ``dict(numpy.load(path))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moe_lightning.routing.base import Routing

COLUMNS = {"layer": np.int16, "token": np.int32, "token_id": np.int32, "label": np.int32, "expert": np.int16, "weight": np.float32}


@torch.no_grad()
def trace_columns(
    routings: Sequence[Routing], token_ids: Tensor, labels: Tensor | None = None, max_tokens: int | None = None
) -> dict[str, np.ndarray]:
    """The rows of the first ``max_tokens`` flattened tokens of every layer, as NumPy columns (one host copy)."""
    token_ids_T = token_ids.reshape(-1)
    labels_T = torch.full_like(token_ids_T, -1) if labels is None else labels.reshape(-1)
    limit = token_ids_T.numel() if max_tokens is None else min(max_tokens, token_ids_T.numel())
    parts: dict[str, list[Tensor]] = {name: [] for name in COLUMNS}
    for layer, routing in enumerate(routings):
        keep_N = routing.token_idx_N < limit
        token_N = routing.token_idx_N[keep_N]
        parts["layer"].append(torch.full_like(token_N, layer))
        parts["token"].append(token_N)
        parts["token_id"].append(token_ids_T[token_N])
        parts["label"].append(labels_T[token_N])
        parts["expert"].append(routing.expert_idx_N[keep_N])
        parts["weight"].append(routing.weight_N[keep_N].float())
    return {name: torch.cat(parts[name]).cpu().numpy().astype(dtype) for name, dtype in COLUMNS.items()}


def trace_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step{step:09d}.npz"


def save_trace(directory: str | Path, step: int, columns: dict[str, np.ndarray]) -> Path:
    path = trace_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, step=np.int64(step), **columns)
    return path


def load_traces(directory: str | Path) -> dict[str, np.ndarray]:
    """All trace files of a directory concatenated, with a ``step`` column; empty columns when there are none."""
    files = sorted(Path(directory).glob("step*.npz"))
    tables = []
    for path in files:
        with np.load(path) as data:
            table = {name: data[name] for name in COLUMNS}
            table["step"] = np.full(len(table["layer"]), int(data["step"]), dtype=np.int64)
            tables.append(table)
    names = [*COLUMNS, "step"]
    if not tables:
        return {name: np.zeros(0, dtype=COLUMNS.get(name, np.int64)) for name in names}
    return {name: np.concatenate([t[name] for t in tables]) for name in names}
