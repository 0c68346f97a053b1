"""Fold a fine-tuned model back into plain weights and write it as an ordinary model file."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from moe_lightning.finetune.expert_rows import merge_expert_rows
from moe_lightning.finetune.lora import has_lora_adapters, merge_lora
from moe_lightning.inference.export import export_safetensors, transformer_of


def merge_finetuned(model: nn.Module) -> nn.Module:
    """``model`` in place with its trained expert rows written back (:func:`merge_expert_rows`) and its LoRA adapters
    folded in (:func:`merge_lora`): the modules it had before fine-tuning, computing what it computes now."""
    merge_expert_rows(model)
    if has_lora_adapters(model):
        merge_lora(model)
    return model


def export_finetuned(module_or_model: nn.Module, path: str | Path) -> None:
    """Write a merged copy of the fine-tuned :class:`MoETransformer` (or the one a module holds as ``.model``) with
    :func:`export_safetensors`; the model itself keeps training as it was."""
    model = copy.deepcopy(transformer_of(module_or_model, "export_finetuned"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    export_safetensors(merge_finetuned(model), path)
