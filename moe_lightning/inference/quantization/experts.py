"""QuantizedExperts: the routed experts of a layer with bitsandbytes int8 / NF4 / FP4 weights, for inference.

A drop-in replacement for :class:`GroupedExperts`: called as ``experts(x_ND, tokens_per_expert_E)`` on rows sorted
by expert, returning one row per input row in the input's (or autocast's) dtype.

Shape legend: N routed rows (sorted by expert), D model dim, F expert hidden dim, E experts,
H input-projection width (2F for SwiGLU: gate and up side by side, F for GELU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.experts.activations import Activation, activate, check_activation, input_width
from moe_lightning.experts.grouped import GroupedExperts, compute_dtype
from moe_lightning.inference.quantization.config import QuantizationConfig, as_config
from moe_lightning.inference.quantization.matrices import QuantizedMatrices


class QuantizedExperts(nn.Module):
    """E MLP experts whose two projections are quantised per expert: ``w_in_EHD`` (expert ``e``'s ``[H, D]`` is
    ``GroupedExperts.w_in_EDH[e].T``) and ``w_down_EDF`` (``w_down_EFD[e].T``), each a :class:`QuantizedMatrices`.

    ``forward`` loops over the experts (bitsandbytes has no grouped GEMM) and skips those without rows. Gradients
    flow to the input (the weights are frozen), as bitsandbytes' matmuls allow.

    Build one from trained experts with :meth:`from_experts`; the constructor makes an empty one of the right
    shapes, into which a saved state is loaded.

    Args:
        num_experts: E.
        dim: model dimension D.
        hidden_dim: expert hidden dimension F.
        activation: ``"swiglu"`` (gated) or ``"gelu"``.
        config: the quantisation format.
        device: where to allocate the buffers.
    """

    def __init__(
        self, num_experts: int, dim: int, hidden_dim: int, activation: Activation = "swiglu",
        config: QuantizationConfig | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_activation(activation)
        self.num_experts, self.dim, self.hidden_dim, self.activation = num_experts, dim, hidden_dim, activation
        self.config = config or QuantizationConfig()
        self.w_in_EHD = QuantizedMatrices(num_experts, input_width(activation, hidden_dim), dim, self.config, device)
        self.w_down_EDF = QuantizedMatrices(num_experts, dim, hidden_dim, self.config, device)

    @classmethod
    def from_experts(
        cls, experts: GroupedExperts, mode: str | QuantizationConfig = "nf4", **options: Any
    ) -> QuantizedExperts:
        """Quantise ``experts`` (on their device). ``mode`` is ``"int8"``, ``"nf4"``, ``"fp4"`` or a
        :class:`QuantizationConfig`; ``options`` are the config's other fields (``blocksize``, ``double_quant``,
        ``compute_dtype``, ``threshold``)."""
        if not isinstance(experts, GroupedExperts):
            raise TypeError(f"from_experts needs GroupedExperts, got {type(experts).__name__}")
        quantized = cls.empty_like(experts, as_config(mode, options))
        quantized.w_in_EHD.quantize_(experts.w_in_EDH.transpose(1, 2))
        quantized.w_down_EDF.quantize_(experts.w_down_EFD.transpose(1, 2))
        return quantized.train(experts.training)

    @classmethod
    def empty_like(cls, experts: GroupedExperts, config: QuantizationConfig) -> QuantizedExperts:
        """An empty (all-zero) stand-in of ``experts``' shapes, to load a saved quantised state into."""
        return cls(experts.num_experts, experts.dim, experts.hidden_dim, experts.activation, config,
                   device=experts.w_in_EDH.device)

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        return per_expert_forward(
            x_ND, tokens_per_expert_E, self.num_experts, self.dim, self.activation,
            lambda e: (self.w_in_EHD, self.w_down_EDF, e),
        )

    def dequantized_weights(self) -> tuple[Tensor, Tensor]:
        """``(w_in_EDH, w_down_EFD)`` as float32 in :class:`GroupedExperts`' layout: the weights this module computes
        with (int8 mode also quantises its activations, which these do not show)."""
        w_in_EDH = torch.stack([self.w_in_EHD.dequantize(e).T for e in range(self.num_experts)])
        w_down_EFD = torch.stack([self.w_down_EDF.dequantize(e).T for e in range(self.num_experts)])
        return w_in_EDH, w_down_EFD

    def keep_experts(self, start: int, stop: int) -> None:
        """Keep only experts ``[start, stop)``, as :meth:`GroupedExperts.keep_experts`."""
        if not 0 <= start < stop <= self.num_experts:
            raise ValueError(f"expert slice [{start}, {stop}) is outside [0, {self.num_experts})")
        self.w_in_EHD.keep(start, stop)
        self.w_down_EDF.keep(start, stop)
        self.num_experts = stop - start

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation!r}")


MatricesOf = Callable[[int], tuple[nn.Module, nn.Module, int]]


def per_expert_forward(
    x_ND: Tensor, tokens_per_expert_E: Tensor, num_experts: int, dim: int, activation: Activation,
    matrices_of: MatricesOf,
) -> Tensor:
    """Each expert's rows through its two projections, skipping experts without rows (bitsandbytes has no grouped
    GEMM). ``matrices_of(e)`` gives expert ``e``'s ``(w_in, w_down, index)``: two modules with ``matmul(x_MK, index)``
    (:class:`QuantizedMatrices` or one of its float stand-ins) and the expert's index in them."""
    dtype = compute_dtype(x_ND)
    x_ND = x_ND.to(dtype)
    counts = tokens_per_expert_E.tolist()
    if len(counts) != num_experts or sum(counts) != x_ND.shape[0]:
        raise ValueError(
            f"tokens_per_expert_E must hold {num_experts} counts summing to the {x_ND.shape[0]} rows, got {counts}"
        )
    outputs = []
    for e, x_nD in enumerate(x_ND.split(counts)):
        if x_nD.shape[0] == 0:
            continue
        w_in, w_down, index = matrices_of(e)
        h_nH = w_in.matmul(x_nD, index)
        outputs.append(w_down.matmul(activate(h_nH, activation), index).to(dtype))
    return torch.cat(outputs) if outputs else x_ND.new_zeros(0, dim)
