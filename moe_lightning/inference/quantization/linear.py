"""QuantizedLinear: an ``nn.Linear`` whose weight bitsandbytes holds in int8, NF4 or FP4, for inference.

Shape legend: M input rows (all leading dimensions flattened), K input features, N output features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.experts.grouped import compute_dtype
from moe_lightning.inference.quantization.config import QuantizationConfig, as_config
from moe_lightning.inference.quantization.matrices import QuantizedMatrices


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` quantised (``weight_NK``, a :class:`QuantizedMatrices` of one matrix).

    Takes ``[..., K]`` and returns ``[..., N]`` in the input's (or autocast's) dtype, as ``nn.Linear`` does. The
    bias, if any, stays a float parameter.

    Args:
        in_features: K.
        out_features: N.
        bias: whether to hold a bias.
        config: the quantisation format.
        device: where to allocate.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, config: QuantizationConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config or QuantizationConfig()
        self.weight_NK = QuantizedMatrices(1, out_features, in_features, self.config, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str | QuantizationConfig = "nf4", **options: Any) -> QuantizedLinear:
        """Quantise ``linear``'s weight (on its device); ``mode`` and ``options`` as in :class:`QuantizationConfig`."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        quantized = cls.empty_like(linear, as_config(mode, options))
        quantized.weight_NK.quantize_(linear.weight.unsqueeze(0))
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return quantized.train(linear.training)

    @classmethod
    def empty_like(cls, linear: nn.Linear, config: QuantizationConfig) -> QuantizedLinear:
        """An empty (all-zero) stand-in of ``linear``'s shape, to load a saved quantised state into."""
        has_bias = linear.bias is not None
        return cls(linear.in_features, linear.out_features, has_bias, config, device=linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        x_MK = x.reshape(-1, self.in_features).to(dtype)
        y_MN = self.weight_NK.matmul(x_MK, 0).to(dtype)
        if self.bias is not None:
            y_MN = y_MN + self.bias.to(dtype)
        return y_MN.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
