"""Tiny random transformers models (CPU, fp32, built in a second): the parity tests' fixtures and the checkpoint that
the fine-tuning recipes start from (``examples/make_tiny_hf_checkpoint.py``). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

COMMON = dict(
    vocab_size=263, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
"""Sizes every family shares: vocab >= 256, GQA, 3 blocks."""

TINY_FAMILIES = {
    "mixtral": dict(head_dim=16, intermediate_size=40, num_local_experts=6, num_experts_per_tok=2),
    "qwen3_moe": dict(head_dim=16, intermediate_size=56, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                      norm_topk_prob=True, mlp_only_layers=[2]),
    "olmoe": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False),
    "qwen2_moe": dict(head_dim=16, num_hidden_layers=4, intermediate_size=56, moe_intermediate_size=24,
                      shared_expert_intermediate_size=36, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2),
    "llama": dict(head_dim=16, intermediate_size=56, tie_word_embeddings=True),
    "qwen2": dict(intermediate_size=56),
    "mistral": dict(head_dim=16, intermediate_size=56, sliding_window=None),
}
"""Per family: odd expert counts and top-k, head_dim != hidden / heads where the family allows, dense blocks placed by
mlp_only_layers / decoder_sparse_step, a shared expert width that is no multiple of the routed one, tied embeddings."""


@torch.no_grad()
def tiny_hf_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A random transformers model of ``model_type`` (a key of :data:`TINY_FAMILIES`) in eval mode, sized by
    :data:`COMMON`, the family's entry and ``overrides`` (transformers config fields), its weights drawn from ``seed``
    and spread so that routing and greedy choices are not near-ties: router gates of std 1 (logit gaps far above
    float32 error), other matrices std 0.15, norm weights in [0.5, 1.5], biases std 0.1.

    Raises:
        ValueError: ``model_type`` has no tiny sizes here.
    """
    if model_type not in TINY_FAMILIES:
        raise ValueError(f"no tiny model for model_type={model_type!r}; choose one of {sorted(TINY_FAMILIES)}")
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[model_type](**{**COMMON, **TINY_FAMILIES[model_type], **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    for name, param in model.named_parameters():
        if "norm" in name:
            nn.init.uniform_(param, 0.5, 1.5)
        elif name.endswith(".bias"):
            nn.init.normal_(param, std=0.1)
        elif name.endswith("mlp.gate.weight"):
            nn.init.normal_(param, std=1.0)
        else:
            nn.init.normal_(param, std=0.15)
    return model.eval()


def save_tiny_hf_checkpoint(directory: str | Path, model_type: str = "mixtral", seed: int = 0, **overrides) -> Path:
    """:func:`tiny_hf_model` written with ``save_pretrained`` to ``directory`` (created; config.json + safetensors).

    Raises:
        ValueError: ``directory`` exists and is not an empty directory (nothing is overwritten).
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"{str(directory)!r} already exists and is not an empty directory; give a new path")
    tiny_hf_model(model_type, seed, **overrides).save_pretrained(directory)
    return directory
