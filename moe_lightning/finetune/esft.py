"""ESFT, Expert-Specialized Fine-Tuning (Wang et al., DeepSeek 2024): per MoE layer, train only the experts the task's
data routes to most; freeze everything else.

Each expert of a layer gets a relevance score on the task's tokens, by one of the paper's two criteria:

- ``"gate"`` (ESFT-Gate, average gate score): the expert's router score averaged over tokens;
- ``"token"`` (ESFT-Token, token selection ratio): the share of the routed (token, expert) rows that went to it.

Scores are normalised to sum to one per layer, and the layer keeps its highest-scoring experts, best first, until
their scores add up to the threshold ``p``. Scores come from a calibration pass (:func:`routing_relevance` summed over
batches) or from a :class:`RouterStatsMonitor` ``router_stats.jsonl`` (its per-layer ``load``: token criterion only).

Shape legend: L MoE layers, E experts, T tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from moe_lightning.routing.base import Routing

Criterion = Literal["gate", "token"]
CRITERIA = ("gate", "token")
ROUNDING_SLACK = 1e-9
"""A cumulative share this close under the threshold counts as reaching it (float sums of exact fractions)."""


def check_threshold(threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise ValueError(f"the ESFT threshold must be in (0, 1], got threshold={threshold}")


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got criterion={criterion!r}")


@torch.no_grad()
def routing_relevance(routings: Sequence[Routing], criterion: Criterion) -> Tensor:
    """Per layer and expert, the unnormalised relevance of one batch ``[L, E]`` (float64, on the CPU): summed router
    scores (``"gate"``) or routed rows (``"token"``). Sum it over batches, then :func:`select_experts`."""
    check_criterion(criterion)
    if criterion == "gate":
        rows = [routing.probs_TE.double().sum(0) for routing in routings]
    else:
        rows = [routing.tokens_per_expert_E.double() for routing in routings]
    return torch.stack(rows).cpu()


def relevance_from_stats_file(path: str | Path, num_layers: int, num_experts: int) -> Tensor:
    """Routed rows per layer and expert ``[L, E]`` summed over every record of a ``router_stats.jsonl`` (the token
    selection criterion's counts); ValueError when the file lacks one of the model's ``num_layers`` MoE layers or
    counts another number of experts."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"the router stats file {str(path)!r} holds no record")
    load_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64)
    for record in records:
        layers = {layer["layer"]: layer["load"] for layer in record["layers"]}
        missing = [layer for layer in range(num_layers) if layer not in layers]
        if missing:
            raise ValueError(
                f"the router stats file {str(path)!r} has no MoE layers {missing} (step {record['step']} records "
                f"layers {sorted(layers)}), but the model has {num_layers}"
            )
        for layer in range(num_layers):
            if len(layers[layer]) != num_experts:
                raise ValueError(
                    f"the router stats file {str(path)!r} counts {len(layers[layer])} experts in MoE layer {layer} "
                    f"(step {record['step']}), but the model has {num_experts}"
                )
            load_LE[layer] += torch.tensor(layers[layer], dtype=torch.float64)
    return load_LE


def select_experts(relevance_LE: Tensor, threshold: float) -> dict[int, list[int]]:
    """Per layer, the fewest highest-relevance experts whose normalised relevance adds up to ``threshold``
    (ties: the lower index first); sorted indices. ValueError for a threshold outside (0, 1] or a layer that no
    token reached."""
    check_threshold(threshold)
    totals_L = relevance_LE.sum(-1)
    empty = [layer for layer, total in enumerate(totals_L.tolist()) if total <= 0]
    if empty:
        raise ValueError(f"no routing in MoE layers {empty}: their experts cannot be ranked")
    selection = {}
    for layer, (relevance_E, total) in enumerate(zip(relevance_LE.double(), totals_L.double())):
        order_E = torch.sort(relevance_E, descending=True, stable=True).indices
        cumulative_E = (relevance_E[order_E] / total).cumsum(0)
        count = int((cumulative_E < threshold - ROUNDING_SLACK).sum()) + 1
        selection[layer] = sorted(order_E[:count].tolist())
    return selection
