"""Tiny random models for the inference tests."""

import pytest
import torch

from moe_lightning.models import MoETransformer, MoETransformerConfig

# A larger init_std than training's default makes the logits peaked, so greedy choices are not near-ties.
TINY = dict(
    vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=4, expert_hidden_dim=32,
    first_k_dense=1, max_seq_len=48, init_std=0.2,
)


def tiny_model(router=None, **overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoETransformerConfig(**{**TINY, **overrides}), router=router).eval()


@pytest.fixture
def model() -> MoETransformer:
    return tiny_model()


@torch.no_grad()
def reference_greedy(model: MoETransformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding the slow way: one full-sequence forward pass (no cache, no padding) per new token."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
