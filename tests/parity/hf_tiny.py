"""Tiny random transformers checkpoints for the import/export parity tests (CPU, fp32, a few seconds each); the
builder and its sizes live in :mod:`moe_lightning.models.hf.tiny`, shared with examples/make_tiny_hf_checkpoint.py."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from moe_lightning.models.hf.tiny import COMMON, TINY_FAMILIES as FAMILIES, tiny_hf_model  # noqa: F401

__all__ = ["COMMON", "FAMILIES", "save", "tiny_hf_model"]


def save(model: nn.Module, directory: Path, **options) -> Path:
    model.save_pretrained(directory, **options)
    return directory
