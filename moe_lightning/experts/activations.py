"""The expert MLP activations, shared by the grouped experts and the dense feed-forward."""

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


def activate(up: Tensor, gate: Tensor | None) -> Tensor:
    """``silu(gate) * up`` for SwiGLU, ``gelu(up)`` for the ungated MLP (``gate`` None)."""
    return F.gelu(up) if gate is None else swiglu(gate, up)
