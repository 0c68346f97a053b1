"""``moe-lightning report RUN_DIR``: a static HTML report, PNG plots and a JSON summary of what the router callbacks
wrote (``router_stats.jsonl`` from :class:`RouterStatsMonitor`, ``routing_traces/`` from :class:`RoutingTraceWriter`)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from moe_lightning.analytics.specialisation import top_tokens_per_expert
from moe_lightning.analytics.traces import load_traces

STATS_FILE = "router_stats.jsonl"
TRACES_DIR = "routing_traces"
TOP_TOKENS = 5


def find_one(run_dir: Path, pattern: str) -> Path | None:
    """The newest match under ``run_dir`` (a run dir may hold several logger versions)."""
    matches = sorted(run_dir.rglob(pattern), key=lambda p: p.stat().st_mtime)
    return matches[-1] if matches else None


def parse_records(text: str) -> list[dict]:
    """The records in a run of complete ``router_stats.jsonl`` lines (the live dashboard feeds it appended text)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_records(path: Path) -> list[dict]:
    return parse_records(path.read_text())


def top_tokens_from_traces(traces: dict[str, np.ndarray], n: int = TOP_TOKENS) -> dict[int, list[list[int]]]:
    """Per layer, each expert's ``n`` most frequent token ids in the traces."""
    result = {}
    num_experts = int(traces["expert"].max()) + 1 if len(traces["expert"]) else 0
    vocab = int(traces["token_id"].max()) + 1 if len(traces["token_id"]) else 0
    for layer in np.unique(traces["layer"]).tolist():
        rows = traces["layer"] == layer
        pairs = torch.from_numpy(traces["token_id"][rows].astype(np.int64) * num_experts + traces["expert"][rows])
        counts = torch.bincount(pairs, minlength=vocab * num_experts).view(vocab, num_experts)
        ids, values = top_tokens_per_expert(counts, n)
        result[layer] = [[i for i, v in zip(row, vals) if v > 0] for row, vals in zip(ids.tolist(), values.tolist())]
    return result


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``index.html``, PNGs and ``summary.json`` to ``out_dir`` (default ``RUN_DIR/report``); return the HTML."""
    from moe_lightning.analytics import plots  # matplotlib only when a report is built

    run_dir = Path(run_dir)
    stats_path = find_one(run_dir, STATS_FILE)
    if stats_path is None:
        raise ValueError(f"no {STATS_FILE} under {str(run_dir)!r}: train with the RouterStatsMonitor callback first")
    records = read_records(stats_path)
    if not records:
        raise ValueError(f"{str(stats_path)!r} holds no record yet")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    last = records[-1]
    label_names = last.get("label_names")

    images = {
        "Load share, layer x expert over time": plots.load_heatmaps(records, out / "load_heatmap.png"),
        "Imbalance and entropy": plots.curves(records, ("imbalance", "cv", "load_entropy", "token_entropy"), out / "balance.png"),
        "Dead experts, churn, specialisation": plots.curves(records, ("dead_experts", "churn", "nmi"), out / "health.png"),
        f"Co-occurrence at step {last['step']}": plots.matrices(last["layers"], "cooccurrence", "expert", out / "cooccurrence.png"),
    }
    if any(layer["label_expert"] for layer in last["layers"]):
        images[f"Specialisation (label x top-1 expert) at step {last['step']}"] = plots.matrices(
            last["layers"], "label_expert", "label", out / "specialisation.png", label_names
        )
    timed = all("expert_time_share" in layer for layer in last["layers"])
    if timed:
        images[f"Expert time share and load share at step {last['step']}"] = plots.time_and_load_shares(
            last["layers"], out / "time_share.png"
        )
    traces_dir = find_one(run_dir, TRACES_DIR)
    top_tokens = top_tokens_from_traces(load_traces(traces_dir)) if traces_dir is not None else {}

    scalars = ("imbalance", "cv", "load_entropy", "token_entropy", "dead_experts", "dropped_fraction",
               "near_tie_fraction", "nmi", "churn")
    summary = {
        "stats_file": str(stats_path),
        "steps": [r["step"] for r in records],
        "final": {"step": last["step"], "layers": [{k: layer[k] for k in ("layer", *scalars)} for layer in last["layers"]]},
        "top_tokens": {str(layer): tokens for layer, tokens in top_tokens.items()},
    }
    if timed:  # RouterStatsMonitor(time_experts=True): each expert's measured share of its layer's expert time
        summary["final"]["expert_time_share"] = [layer["expert_time_share"] for layer in last["layers"]]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "index.html").write_text(_html(summary, images, scalars))
    return out / "index.html"


def _html(summary: dict, images: dict[str, str], scalars: tuple[str, ...]) -> str:
    def cell(value):
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    header = "".join(f"<th>{name}</th>" for name in ("layer", *scalars))
    rows = "".join(
        "<tr>" + "".join(f"<td>{cell(layer[k])}</td>" for k in ("layer", *scalars)) + "</tr>"
        for layer in summary["final"]["layers"]
    )
    figures = "".join(f'<h2>{html.escape(title)}</h2><img src="{name}">' for title, name in images.items())
    tokens = "".join(
        f"<h3>layer {layer}</h3><ol start=0>" + "".join(f"<li>{ids}</li>" for ids in experts) + "</ol>"
        for layer, experts in summary["top_tokens"].items()
    )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>Router report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}</style></head><body>"
        f"<h1>Router report</h1><p>{html.escape(summary['stats_file'])}, steps {summary['steps'][0]} to {summary['steps'][-1]}</p>"
        f"<h2>Final statistics (step {summary['final']['step']})</h2><table><tr>{header}</tr>{rows}</table>{figures}"
        f"<h2>Top token ids per expert (from the traces)</h2>{tokens or '<p>no traces</p>'}</body></html>"
    )
