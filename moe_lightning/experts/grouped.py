"""All experts of a layer as 3-D weights, run by one grouped GEMM per projection or by a plain loop.

Shape legend: N routed rows (sorted by expert), D model dim, F expert hidden dim, E experts,
H input-projection width (2F for SwiGLU: gate and up side by side, F for GELU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from moe_lightning.experts.activations import Activation, activate, check_activation, input_width
from moe_lightning.kernels.grouped_gemm import (
    grouped_gemm,
    grouped_gemm_reference,
    grouped_gemm_supported,
    grouped_gemm_weights_supported,
)

Implementation = Literal["auto", "triton", "grouped_mm", "loop"]
IMPLEMENTATIONS = ("auto", "triton", "grouped_mm", "loop")


class GroupedExperts(nn.Module):
    """E independent MLP experts stored as ``w_in_EDH`` (gate columns, then up columns) and ``w_down_EFD``.

    ``forward`` takes rows already sorted by expert (``tokens_per_expert_E[e]`` consecutive rows for
    expert ``e``) and returns one output row per input row. Three implementations compute the same thing:

    - ``"grouped_mm"``: one ``torch grouped_mm`` per projection over all experts (the fast path on GPUs;
      gate and up share one GEMM, which keeps its tiles wide when F is small);
    - ``"triton"``: the same two GEMMs from :mod:`moe_lightning.kernels.grouped_gemm`, autotuned per shape (bf16 on
      CUDA, dim and hidden_dim multiples of 64, not under ``torch.compile``); on an H200 they run at 0.78 to 0.99x
      torch's CUTLASS kernels (``benchmarks/grouped_gemm.py``), so only on request;
    - ``"loop"``: a Python loop over experts with ordinary matmuls (the readable reference).

    ``"auto"`` picks grouped_mm wherever torch has a kernel for the input (any float dtype on the CPU, bf16
    on CUDA) and the loop elsewhere (e.g. fp32 on CUDA).

    Args:
        num_experts: E.
        dim: model dimension D.
        hidden_dim: expert hidden dimension F.
        activation: ``"swiglu"`` (gated) or ``"gelu"``.
        implementation: ``"auto"``, ``"triton"``, ``"grouped_mm"`` or ``"loop"``.
        init_std: standard deviation of the normal initialisation.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        activation: Activation = "swiglu",
        implementation: Implementation = "auto",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        check_activation(activation)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got implementation={implementation!r}")
        if min(num_experts, dim, hidden_dim) < 1:
            raise ValueError(f"num_experts, dim and hidden_dim must be >= 1, got {num_experts=}, {dim=}, {hidden_dim=}")
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.implementation = implementation
        self.init_std = init_std
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, dim, input_width(activation, hidden_dim)))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    @property
    def num_experts(self) -> int:
        """The experts this module holds (a slice of the layer's after :meth:`keep_experts` or per-rank loading)."""
        return self.w_in_EDH.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in_EDH, std=self.init_std)
        # Scale the output projection like a residual branch so deep stacks start near identity.
        nn.init.normal_(self.w_down_EFD, std=self.init_std / math.sqrt(2))

    def keep_experts(self, start: int, stop: int) -> None:
        """Keep only experts ``[start, stop)``: expert parallelism gives each rank one slice of every layer."""
        if not 0 <= start < stop <= self.num_experts:
            raise ValueError(f"expert slice [{start}, {stop}) is outside [0, {self.num_experts})")
        for name, weight in list(self.named_parameters(recurse=False)):
            sliced = nn.Parameter(weight.detach()[start:stop].clone(), requires_grad=weight.requires_grad)
            setattr(self, name, sliced)

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        dtype = compute_dtype(x_ND)
        x_ND = x_ND.to(dtype)
        w_in_EDH, w_down_EFD = self.w_in_EDH.to(dtype), self.w_down_EFD.to(dtype)
        implementation = resolve_implementation(self.implementation, x_ND, w_in_EDH, w_down_EFD)
        if implementation == "loop":
            return self._forward_loop(x_ND, tokens_per_expert_E, w_in_EDH, w_down_EFD)
        gemm = grouped_gemm_for(implementation)
        row_ends_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
        h_NH = gemm(x_ND, w_in_EDH, row_ends_E)
        return gemm(activate(h_NH, self.activation), w_down_EFD, row_ends_E)

    def _forward_loop(self, x_ND: Tensor, tokens_per_expert_E: Tensor, w_in_EDH: Tensor, w_down_EFD: Tensor) -> Tensor:
        outputs = []
        for e, x_nD in enumerate(x_ND.split(tokens_per_expert_E.tolist())):
            outputs.append(activate(x_nD @ w_in_EDH[e], self.activation) @ w_down_EFD[e])
        return torch.cat(outputs) if outputs else x_ND.new_zeros(0, w_down_EFD.shape[-1])


def compute_dtype(x: Tensor) -> torch.dtype:
    # Under autocast the parameters stay fp32; grouped_mm is not autocast-aware, so cast explicitly.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def torch_grouped_mm_supported(x: Tensor) -> bool:
    return x.device.type == "cpu" or x.dtype == torch.bfloat16


def resolve_implementation(
    implementation: Implementation, x_ND: Tensor, w_in_EDH: Tensor, w_down_EFD: Tensor
) -> Implementation:
    """The implementation that runs ``implementation`` on these operands (``"auto"`` resolved as documented above)."""
    if implementation == "triton":
        # The down projection's input is the activation, a fresh contiguous tensor: only its weights can refuse.
        if not (grouped_gemm_supported(x_ND, w_in_EDH) and grouped_gemm_weights_supported(w_down_EFD)):
            raise ValueError(
                "implementation='triton' needs contiguous bf16 CUDA operands with dim and hidden_dim divisible by 64, "
                f"got x {x_ND.dtype} {tuple(x_ND.shape)} on {x_ND.device}, w_in {w_in_EDH.dtype} "
                f"{tuple(w_in_EDH.shape)}, w_down {w_down_EFD.dtype} {tuple(w_down_EFD.shape)}"
            )
        if torch.compiler.is_compiling():
            raise ValueError("implementation='triton' does not run under torch.compile; use 'auto' or 'grouped_mm'")
    if implementation != "auto":
        return implementation
    return "grouped_mm" if torch_grouped_mm_supported(x_ND) else "loop"


def grouped_gemm_for(implementation: Implementation) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The grouped GEMM ``(x, w, row_ends) -> out`` of a resolved implementation other than ``"loop"``."""
    return grouped_gemm if implementation == "triton" else grouped_gemm_reference
