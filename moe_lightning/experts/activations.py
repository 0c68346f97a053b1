"""The expert MLP activations, shared by the grouped experts and the dense feed-forward.

Gated activations take the fused input projection ``h = [gate | up]`` (width 2F) and return width F.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from moe_lightning.kernels.swiglu import swiglu

Activation = Literal["swiglu", "gelu"]
ACTIVATIONS = ("swiglu", "gelu")


def is_gated(activation: str) -> bool:
    return activation == "swiglu"


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got activation={activation!r}")


def input_width(activation: str, hidden_dim: int) -> int:
    """Width of the input projection: gate and up side by side when gated."""
    return 2 * hidden_dim if is_gated(activation) else hidden_dim


def activate(h: Tensor, activation: str) -> Tensor:
    """``silu(gate) * up`` for SwiGLU (``h = [gate | up]``), ``gelu(h)`` for the ungated MLP."""
    return swiglu(h) if is_gated(activation) else F.gelu(h)
