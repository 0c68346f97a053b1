"""Cheap fine-tuning of MoE models: chosen experts only, ESFT, LoRA and QLoRA; plain functions and YAML callbacks.

The functions (``freezing``, ``expert_rows``, ``lora_experts``, ``lora``, ``esft``, ``export``) are plain PyTorch;
``callbacks`` wraps them for ``trainer.callbacks`` in a LightningCLI config.
"""

from moe_lightning.finetune.callbacks import ESFTFineTuning, ExpertFineTuning, FineTuningCallback, LoRAFineTuning
from moe_lightning.finetune.esft import relevance_from_stats_file, routing_relevance, select_experts
from moe_lightning.finetune.expert_rows import merge_expert_rows, train_only_experts_of
from moe_lightning.finetune.export import export_finetuned, merge_finetuned
from moe_lightning.finetune.freezing import freeze_all_but_experts, freeze_routers, moe_layers, train_only_experts
from moe_lightning.finetune.lora import apply_lora, merge_lora
from moe_lightning.finetune.lora_experts import LoRAExperts

__all__ = [
    "ESFTFineTuning", "ExpertFineTuning", "FineTuningCallback", "LoRAExperts", "LoRAFineTuning", "apply_lora",
    "export_finetuned", "freeze_all_but_experts", "freeze_routers", "merge_expert_rows", "merge_finetuned",
    "merge_lora", "moe_layers", "relevance_from_stats_file", "routing_relevance", "select_experts",
    "train_only_experts", "train_only_experts_of",
]
