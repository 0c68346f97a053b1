"""Matplotlib figures of the router statistics records (see :class:`RouterStatsMonitor`), saved as PNGs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def load_heatmaps(records: list[dict], path: Path) -> str:
    """One panel per layer: load share of each expert (x) at each logged step (y)."""
    num_layers = len(records[0]["layers"])
    fig, axes = plt.subplots(1, num_layers, figsize=(3.2 * num_layers, 3), squeeze=False)
    steps = [r["step"] for r in records]
    for layer, ax in enumerate(axes[0]):
        share = np.array([r["layers"][layer]["load_share"] for r in records])
        image = ax.imshow(share, aspect="auto", cmap="viridis", extent=(-0.5, share.shape[1] - 0.5, max(steps[-1], steps[0] + 1), steps[0]))
        ax.set(title=f"layer {layer}", xlabel="expert", ylabel="step")
        fig.colorbar(image, ax=ax, label="load share")
    return _save(fig, path)


def curves(records: list[dict], names: tuple[str, ...], path: Path) -> str:
    """One panel per statistic, one line per layer, against the step."""
    fig, axes = plt.subplots(1, len(names), figsize=(3.5 * len(names), 3), squeeze=False)
    steps = [r["step"] for r in records]
    for name, ax in zip(names, axes[0]):
        for layer in range(len(records[0]["layers"])):
            values = [r["layers"][layer][name] for r in records]
            ax.plot(steps, [np.nan if v is None else v for v in values], marker=".", label=f"layer {layer}")
        ax.set(title=name, xlabel="step")
    axes[0][-1].legend(fontsize="small")
    return _save(fig, path)


def matrices(layers: list[dict], key: str, ylabel: str, path: Path, row_names: list[str] | None = None) -> str:
    """One panel per layer of a count matrix (rows normalised to fractions)."""
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        counts = np.array(layers[layer][key], dtype=float)
        image = ax.imshow(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1), cmap="magma", vmin=0, vmax=1)
        ax.set(title=f"layer {layer}", xlabel="expert", ylabel=ylabel)
        if row_names:
            ax.set_yticks(range(len(row_names)), row_names, fontsize="small")
        fig.colorbar(image, ax=ax)
    return _save(fig, path)


def time_and_load_shares(layers: list[dict], path: Path) -> str:
    """One panel per layer: each expert's share of the layer's expert time beside its share of the routed rows (an
    expert whose time share exceeds its load share costs more per routed row)."""
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        experts = np.arange(len(layers[layer]["load_share"]))
        ax.bar(experts - 0.2, layers[layer]["expert_time_share"], width=0.4, label="time share")
        ax.bar(experts + 0.2, layers[layer]["load_share"], width=0.4, label="load share")
        ax.set(title=f"layer {layer}", xlabel="expert")
    axes[0][-1].legend(fontsize="small")
    return _save(fig, path)
