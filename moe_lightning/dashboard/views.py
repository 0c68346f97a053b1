"""What the dashboard sends of each record, and the checks on a client's layer and step range."""

from __future__ import annotations

CURVES = ("imbalance", "cv", "load_entropy", "token_entropy", "nmi", "dead_experts")
"""Per-layer scalars drawn over steps."""


class UnknownLayerError(LookupError):
    pass


def slim(record: dict) -> dict:
    """The step and each layer's load and curves: the matrices stay on disk (L x E x E is large for 64 experts)."""
    return {
        "step": record["step"],
        "layers": [{key: layer[key] for key in ("layer", "load", "load_share", *CURVES)} for layer in record["layers"]],
    }


def in_step_range(records: list[dict], start: int | None, end: int | None) -> list[dict]:
    """Records whose step is in ``[start, end]``; ``None`` leaves that side open."""
    if start is not None and end is not None and start > end:
        raise ValueError(f"empty step range: start={start} > end={end}")
    return [r for r in records if (start is None or r["step"] >= start) and (end is None or r["step"] <= end)]


def layer_series(records: list[dict], layer: int, start: int | None = None, end: int | None = None) -> dict:
    """One layer's load share per step (``[steps, E]``) and its curves over ``[start, end]``."""
    num_layers = len(records[0]["layers"]) if records else 0
    if not 0 <= layer < num_layers:
        have = f"layers 0..{num_layers - 1}" if num_layers else "no record yet"
        raise UnknownLayerError(f"unknown layer {layer}: the run has {have}")
    chosen = in_step_range(records, start, end)
    rows = [r["layers"][layer] for r in chosen]
    return {
        "layer": layer,
        "steps": [r["step"] for r in chosen],
        "load_share": [row["load_share"] for row in rows],
        **{name: [row[name] for row in rows] for name in CURVES},
    }
