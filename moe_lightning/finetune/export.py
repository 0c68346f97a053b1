"""Fold a fine-tuned model back into plain weights and write it as an ordinary model file or transformers checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from torch import nn

from moe_lightning.finetune.expert_rows import merge_expert_rows
from moe_lightning.finetune.lora import has_lora_adapters, merge_lora
from moe_lightning.inference.export import export_safetensors, transformer_of
from moe_lightning.models.transformer import MoETransformer

ExportFormat = Literal["safetensors", "hf"]
EXPORT_FORMATS = ("safetensors", "hf")


def merge_finetuned(model: nn.Module) -> nn.Module:
    """``model`` in place with its trained expert rows written back (:func:`merge_expert_rows`) and its LoRA adapters
    folded in (:func:`merge_lora`): the modules it had before fine-tuning, computing what it computes now."""
    merge_expert_rows(model)
    if has_lora_adapters(model):
        merge_lora(model)
    return model


def check_export_format(export_format: str) -> None:
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format must be one of {EXPORT_FORMATS}, got export_format={export_format!r}")


def check_export(
    module_or_model: nn.Module, path: str | Path, export_format: ExportFormat = "safetensors",
    hf_family: str | None = None,
) -> MoETransformer:
    """The model an export would write, after the checks that need no training: the format, and for ``"hf"`` an empty
    target directory and a model that fits the transformers family (ValueError naming what does not)."""
    check_export_format(export_format)
    model = transformer_of(module_or_model, "export_finetuned")
    if export_format == "hf":
        from moe_lightning.models.hf.export import export_family

        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"the export directory {path} exists and is not empty")
        export_family(model, hf_family)
    return model


def export_finetuned(
    module_or_model: nn.Module, path: str | Path, export_format: ExportFormat = "safetensors",
    hf_family: str | None = None,
) -> None:
    """Write a merged copy of the fine-tuned :class:`MoETransformer` (or the one a module holds as ``.model``); the
    model itself keeps training as it was.

    Args:
        module_or_model: the fine-tuned model or its LightningModule.
        path: the ``.safetensors`` file (:func:`export_safetensors`), or for ``"hf"`` the checkpoint directory.
        export_format: ``"safetensors"`` (our self-describing file) or ``"hf"`` (a transformers checkpoint directory
            through :func:`moe_lightning.models.hf.export_hf`).
        hf_family: the transformers family of an ``"hf"`` export (e.g. ``"mixtral"``); None: the family the model was
            imported from.
    """
    model = copy.deepcopy(check_export(module_or_model, path, export_format, hf_family))
    merge_finetuned(model)
    if export_format == "hf":
        from moe_lightning.models.hf.export import export_hf

        export_hf(model, path, hf_family)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    export_safetensors(model, path)
