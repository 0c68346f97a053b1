"""moe_lightning on DeepSpeed: a ZeRO strategy that keeps moe_lightning's expert parallelism, DeepSpeed-MoE's layer as
an experts backend, and checkpoint conversion. Importing this package does not import deepspeed."""

from moe_lightning_deepspeed.strategy import DeepSpeedExpertParallelStrategy

__all__ = ["DeepSpeedExpertParallelStrategy"]
