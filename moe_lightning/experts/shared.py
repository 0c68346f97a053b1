"""Shared experts (DeepSeek-MoE, Qwen-MoE): a dense MLP every token passes through beside the routed experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_lightning.experts.activations import Activation
from moe_lightning.experts.feedforward import FeedForward


class SharedExperts(nn.Module):
    """``num_shared_experts`` always-on experts fused into one MLP of width ``num_shared_experts * hidden_dim``.

    With ``gated=True`` the output is scaled per token by ``sigmoid(w . x)`` as in Qwen2-MoE.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_shared_experts: int = 1,
        activation: Activation = "swiglu",
        gated: bool = False,
    ) -> None:
        super().__init__()
        if num_shared_experts < 1:
            raise ValueError(f"num_shared_experts must be >= 1, got num_shared_experts={num_shared_experts}")
        self.mlp = FeedForward(dim, hidden_dim * num_shared_experts, activation)
        self.gate = nn.Linear(dim, 1, bias=False) if gated else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(x)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out
