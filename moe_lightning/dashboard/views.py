"""What the dashboard sends of each record, and the checks on a client's layer and step range."""

from __future__ import annotations

import torch

from moe_lightning.analytics.specialisation import normalized_mutual_information

CURVES = ("imbalance", "cv", "load_entropy", "token_entropy", "nmi", "dead_experts")
"""Per-layer scalars drawn over steps."""


class UnknownLayerError(LookupError):
    pass


PER_EXPERT = ("load", "load_share", "expert_time_share")
"""Per-layer vectors of one value per expert; ``expert_time_share`` only where the monitor timed the experts."""


def slim(record: dict) -> dict:
    """The step and each layer's per-expert vectors and curves: the matrices stay on disk (L x E x E is large for 64
    experts)."""
    return {
        "step": record["step"],
        "layers": [{key: layer[key] for key in ("layer", *PER_EXPERT, *CURVES) if key in layer}
                   for layer in record["layers"]],
    }


def in_step_range(records: list[dict], start: int | None, end: int | None) -> list[dict]:
    """Records whose step is in ``[start, end]``; ``None`` leaves that side open."""
    if start is not None and end is not None and start > end:
        raise ValueError(f"empty step range: start={start} > end={end}")
    return [r for r in records if (start is None or r["step"] >= start) and (end is None or r["step"] <= end)]


def _check_layer(records: list[dict], layer: int) -> int:
    num_layers = len(records[0]["layers"]) if records else 0
    if not 0 <= layer < num_layers:
        have = f"layers 0..{num_layers - 1}" if num_layers else "no record yet"
        raise UnknownLayerError(f"unknown layer {layer}: the run has {have}")
    return num_layers


def layer_series(records: list[dict], layer: int, start: int | None = None, end: int | None = None) -> dict:
    """One layer's load share per step (``[steps, E]``), its expert time share per step (``None`` at steps whose
    experts were not timed) and its curves over ``[start, end]``."""
    _check_layer(records, layer)
    chosen = in_step_range(records, start, end)
    rows = [r["layers"][layer] for r in chosen]
    return {
        "layer": layer,
        "steps": [r["step"] for r in chosen],
        "load_share": [row["load_share"] for row in rows],
        "expert_time_share": [row.get("expert_time_share") for row in rows],
        **{name: [row[name] for row in rows] for name in CURVES},
    }


def layer_matrices(records: list[dict], layer: int, start: int | None = None, end: int | None = None) -> dict:
    """One layer's count matrices summed over the records in ``[start, end]``, each with its row shares.

    - ``specialisation``: label x top-1 expert, the share of each label's tokens, with ``rows`` (the label names) and
      the ``nmi`` of the summed table;
    - ``cooccurrence``: expert x expert, the share of the tokens that picked expert i that also picked expert j (the
      diagonal, i with itself, is ``None``). The records hold no token count, so "share of all tokens" would have to
      guess the tokens from the rows, which only top-k without drops allows; this share is exact for every router;
    - ``transitions``: top-1 expert at this layer x top-1 expert at the next, the share of the tokens of each row.

    Each matrix also carries its ``counts`` and its ``row_tokens`` (the denominators); a share whose row has no token
    is ``None``. A matrix with nothing to show is ``{"note": why}`` instead.
    """
    num_layers = _check_layer(records, layer)
    chosen = in_step_range(records, start, end)
    if not chosen:
        note = {"note": "no record in the chosen steps"}
        return {"layer": layer, "start": start, "end": end, "records": 0,
                "specialisation": note, "cooccurrence": note, "transitions": note}
    rows = [r["layers"][layer] for r in chosen]
    return {
        "layer": layer,
        "start": chosen[0]["step"],
        "end": chosen[-1]["step"],
        "records": len(chosen),
        "specialisation": _specialisation([row.get("label_expert") for row in rows], _label_names(chosen)),
        "cooccurrence": _cooccurrence([row.get("cooccurrence") for row in rows]),
        "transitions": _transitions(chosen, layer, num_layers),
    }


def _summed(matrices: list[list[list[float]] | None]) -> list[list[float]] | None:
    """The element-wise sum, or ``None`` when a record lacks the matrix or it has no row."""
    if any(m is None for m in matrices) or not matrices or not matrices[0]:
        return None
    total = [list(map(float, row)) for row in matrices[0]]
    for matrix in matrices[1:]:
        for total_row, row in zip(total, matrix):
            for j, value in enumerate(row):
                total_row[j] += value
    return total


def _shares(counts: list[list[float]], row_tokens: list[float], skip_diagonal: bool = False) -> list[list]:
    return [
        [None if tokens <= 0 or (skip_diagonal and i == j) else value / tokens for j, value in enumerate(row)]
        for i, (row, tokens) in enumerate(zip(counts, row_tokens))
    ]


def _label_names(records: list[dict]) -> list[str] | None:
    return next((r["label_names"] for r in reversed(records) if r.get("label_names")), None)


def _specialisation(matrices: list, label_names: list[str] | None) -> dict:
    counts = _summed(matrices)
    if counts is None:
        return {"note": "no labels in this run"}
    row_tokens = [sum(row) for row in counts]
    if not any(row_tokens):
        return {"note": "no labelled tokens in the chosen steps"}
    named = bool(label_names) and len(label_names) == len(counts)
    names = label_names if named else [f"label {c}" for c in range(len(counts))]
    return {
        "rows": list(names),
        "counts": counts,
        "row_tokens": row_tokens,
        "share": _shares(counts, row_tokens),
        "nmi": float(normalized_mutual_information(torch.tensor(counts, dtype=torch.float64))),
    }


def _cooccurrence(matrices: list) -> dict:
    counts = _summed(matrices)
    if counts is None:
        return {"note": "no co-occurrence counts in these records"}
    row_tokens = [counts[i][i] for i in range(len(counts))]
    if not any(row_tokens):
        return {"note": "no routed token in the chosen steps"}
    if not any(value for i, row in enumerate(counts) for j, value in enumerate(row) if i != j):
        return {"note": "every token picked a single expert: nothing co-occurs"}
    return {"counts": counts, "row_tokens": row_tokens, "share": _shares(counts, row_tokens, skip_diagonal=True)}


def _transitions(records: list[dict], layer: int, num_layers: int) -> dict:
    if layer == num_layers - 1:
        return {"note": f"layer {layer} is the last MoE layer: no next layer"}
    counts = _summed([r["transitions"][layer] if r.get("transitions") else None for r in records])
    if counts is None:
        return {"note": "no transition counts in these records"}
    row_tokens = [sum(row) for row in counts]
    if not any(row_tokens):
        return {"note": "no token routed at both layers in the chosen steps"}
    return {"next_layer": layer + 1, "counts": counts, "row_tokens": row_tokens, "share": _shares(counts, row_tokens)}
