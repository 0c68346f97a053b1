"""A dense feed-forward block: the dense layers of the transformer and the shared experts use it."""

from __future__ import annotations

from torch import Tensor, nn

from moe_lightning.experts.activations import Activation, activate, check_activation, input_width


class FeedForward(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (SwiGLU) or ``down(gelu(up(x)))``.

    ``in_proj`` holds gate and up side by side (gate rows first) so they are one matmul.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: Activation = "swiglu") -> None:
        super().__init__()
        check_activation(activation)
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"dim and hidden_dim must be >= 1, got dim={dim}, hidden_dim={hidden_dim}")
        self.activation = activation
        self.in_proj = nn.Linear(dim, input_width(activation, hidden_dim), bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(activate(self.in_proj(x), self.activation))
