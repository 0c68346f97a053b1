"""A dense feed-forward block: the dense layers of the transformer and the shared experts use it."""

from __future__ import annotations

from torch import Tensor, nn

from moe_lightning.experts.activations import Activation, activate, check_activation, is_gated


class FeedForward(nn.Module):
    """``down(act(gate(x)) * up(x))`` (SwiGLU) or ``down(gelu(up(x)))``."""

    def __init__(self, dim: int, hidden_dim: int, activation: Activation = "swiglu") -> None:
        super().__init__()
        check_activation(activation)
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"dim and hidden_dim must be >= 1, got dim={dim}, hidden_dim={hidden_dim}")
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False) if is_gated(activation) else None
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = None if self.gate_proj is None else self.gate_proj(x)
        return self.down_proj(activate(self.up_proj(x), gate))
