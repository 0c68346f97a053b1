"""LoRAExperts: a low-rank adapter per routed expert over frozen base experts (float: LoRA; quantised: QLoRA).

Why not peft's ``target_parameters``: peft's ``ParamWrapper`` does adapt ``GroupedExperts.w_in_EDH`` (forward and
backward agree on the grouped_mm and loop paths), but it folds the adapter into a full ``[E, D, H]`` weight on every
forward, and its backward builds a gradient of that full stack. At E=16, D=512, F=1024 (96 MB of expert weights),
2048 rows, rank 8, torch's profiler counted 392 MB allocated by one forward and backward through peft, 150 MB here.
It cannot adapt quantised experts either (their weights are bitsandbytes buffers, not parameters). Here the adapter
runs on the routed rows only, ``(x A) B`` by two more grouped GEMMs of rank R, and the same code serves a float and
a quantised base.

Shape legend: N routed rows (sorted by expert), D model dim, F expert hidden dim, E experts, R adapter rank,
H input-projection width (2F for SwiGLU: gate and up side by side, F for GELU).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from moe_lightning.experts.activations import activate, input_width
from moe_lightning.experts.grouped import GroupedExperts, compute_dtype, grouped_gemm_for, resolve_implementation
from moe_lightning.finetune.expert_rows import plain_experts_like
from moe_lightning.inference.quantization.experts import QuantizedExperts

LoRAImplementation = Literal["auto", "grouped_mm", "loop"]
LORA_IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")
GROUPED_MM_STRIDE_BYTES = 16
"""torch's grouped_mm refuses operands whose row stride is not a multiple of this."""


class LoRAExperts(nn.Module):
    """Routed experts whose expert ``e`` computes ``act(x (W_in[e] + s A_in[e] B_in[e])) (W_down[e] + s A_down[e]
    B_down[e])`` with the base weights ``W`` frozen and ``s = alpha / rank``.

    The adapters start as LoRA's do (``A`` uniform in ``±1/sqrt(fan_in)``, ``B`` zero), so the wrapped experts
    first compute exactly what the base computes. They stay float32 parameters whatever the base stores.

    Two implementations compute the same thing: ``"grouped_mm"`` runs the base projection of a float base and all
    adapter products as torch grouped GEMMs; ``"loop"`` (the readable reference) loops over experts. ``"auto"`` picks
    grouped_mm wherever torch has a kernel for the input, as :class:`GroupedExperts` does. A quantised base has no
    grouped GEMM (bitsandbytes multiplies one matrix at a time), so its base projection loops in both.

    Args:
        base: the experts to adapt, :class:`GroupedExperts` or :class:`QuantizedExperts`; frozen here.
        rank: R.
        alpha: the adapter scale numerator (LoRA's ``lora_alpha``).
        implementation: ``"auto"``, ``"grouped_mm"`` or ``"loop"``.
    """

    def __init__(
        self, base: GroupedExperts | QuantizedExperts, rank: int = 8, alpha: float = 16.0,
        implementation: LoRAImplementation = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base, (GroupedExperts, QuantizedExperts)):
            raise TypeError(f"LoRAExperts adapts GroupedExperts or QuantizedExperts, got {type(base).__name__}")
        check_rank_alpha(rank, alpha)
        if implementation not in LORA_IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {LORA_IMPLEMENTATIONS}, got {implementation=!r}")
        self.base = base.requires_grad_(False)
        self.num_experts, self.dim, self.hidden_dim = base.num_experts, base.dim, base.hidden_dim
        self.activation = base.activation
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.implementation = implementation
        E, D, F, R, H = self.num_experts, self.dim, self.hidden_dim, rank, input_width(self.activation, self.hidden_dim)
        device = next(iter(base.buffers() if isinstance(base, QuantizedExperts) else base.parameters())).device
        self.lora_in_A_EDR = nn.Parameter(torch.empty(E, D, R, device=device))
        self.lora_in_B_ERH = nn.Parameter(torch.zeros(E, R, H, device=device))
        self.lora_down_A_EFR = nn.Parameter(torch.empty(E, F, R, device=device))
        self.lora_down_B_ERD = nn.Parameter(torch.zeros(E, R, D, device=device))
        nn.init.uniform_(self.lora_in_A_EDR, -1 / math.sqrt(D), 1 / math.sqrt(D))
        nn.init.uniform_(self.lora_down_A_EFR, -1 / math.sqrt(F), 1 / math.sqrt(F))

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        dtype = compute_dtype(x_ND)
        x_ND = x_ND.to(dtype)
        a_in_EDR, b_in_ERH, a_down_EFR, b_down_ERD = (
            p.to(dtype) for p in (self.lora_in_A_EDR, self.lora_in_B_ERH, self.lora_down_A_EFR, self.lora_down_B_ERD)
        )
        implementation = self._resolve_implementation(x_ND, a_in_EDR, b_down_ERD)
        if implementation == "loop":
            return self._forward_loop(x_ND, tokens_per_expert_E, a_in_EDR, b_in_ERH, a_down_EFR, b_down_ERD)
        gemm = grouped_gemm_for(implementation)
        row_ends_E = tokens_per_expert_E.cumsum(0).to(torch.int32)
        h_NH = self._base_grouped("in", x_ND, tokens_per_expert_E, gemm, row_ends_E)
        # The scale goes on the rank-R intermediate, the narrowest tensor of the adapter path.
        h_NH = h_NH + gemm(self.scaling * gemm(x_ND, a_in_EDR, row_ends_E), b_in_ERH, row_ends_E)
        a_NF = activate(h_NH, self.activation)
        y_ND = self._base_grouped("down", a_NF, tokens_per_expert_E, gemm, row_ends_E)
        return y_ND + gemm(self.scaling * gemm(a_NF, a_down_EFR, row_ends_E), b_down_ERD, row_ends_E)

    def _resolve_implementation(self, x_ND: Tensor, a_in_EDR: Tensor, b_down_ERD: Tensor) -> LoRAImplementation:
        """As :class:`GroupedExperts` resolves, and: torch's grouped_mm needs 16-byte row strides, so the rank-R
        operands need ``R * itemsize`` to be a multiple of 16 (R a multiple of 4 in fp32, of 8 in bf16); ``"auto"``
        loops otherwise."""
        implementation = resolve_implementation(self.implementation, x_ND, a_in_EDR, b_down_ERD)
        if implementation == "loop" or self.rank * x_ND.dtype.itemsize % GROUPED_MM_STRIDE_BYTES == 0:
            return implementation
        if self.implementation == "grouped_mm":
            raise ValueError(
                f"implementation='grouped_mm' needs rank * itemsize to be a multiple of {GROUPED_MM_STRIDE_BYTES} "
                f"bytes, got rank={self.rank} in {x_ND.dtype}; use implementation='auto' or another rank"
            )
        return "loop"

    def _forward_loop(
        self, x_ND: Tensor, tokens_per_expert_E: Tensor, a_in_EDR: Tensor, b_in_ERH: Tensor, a_down_EFR: Tensor,
        b_down_ERD: Tensor,
    ) -> Tensor:
        outputs = []
        for e, x_nD in enumerate(x_ND.split(tokens_per_expert_E.tolist())):
            h_nH = self._base_matmul("in", x_nD, e) + self.scaling * (x_nD @ a_in_EDR[e]) @ b_in_ERH[e]
            a_nF = activate(h_nH, self.activation)
            outputs.append(self._base_matmul("down", a_nF, e) + self.scaling * (a_nF @ a_down_EFR[e]) @ b_down_ERD[e])
        return torch.cat(outputs) if outputs else x_ND.new_zeros(0, self.dim)

    def _base_matmul(self, projection: Literal["in", "down"], x_nK: Tensor, e: int) -> Tensor:
        """Expert ``e``'s frozen base projection of its rows, in ``x_nK``'s dtype."""
        if isinstance(self.base, QuantizedExperts):
            matrices = self.base.w_in_EHD if projection == "in" else self.base.w_down_EDF
            return matrices.matmul(x_nK, e).to(x_nK.dtype)
        weight_EKM = self.base.w_in_EDH if projection == "in" else self.base.w_down_EFD
        return x_nK @ weight_EKM[e].to(x_nK.dtype)

    def _base_grouped(
        self, projection: Literal["in", "down"], x_NK: Tensor, tokens_per_expert_E: Tensor,
        gemm: Callable[[Tensor, Tensor, Tensor], Tensor], row_ends_E: Tensor,
    ) -> Tensor:
        """The base projection of all rows: one grouped GEMM for a float base, a loop for a quantised one."""
        if isinstance(self.base, QuantizedExperts):
            rows = [self._base_matmul(projection, x_nK, e)
                    for e, x_nK in enumerate(x_NK.split(tokens_per_expert_E.tolist())) if x_nK.shape[0]]
            width = self.base.w_in_EHD.out_features if projection == "in" else self.dim
            return torch.cat(rows) if rows else x_NK.new_zeros(0, width)
        weight_EKM = self.base.w_in_EDH if projection == "in" else self.base.w_down_EFD
        return gemm(x_NK, weight_EKM.to(x_NK.dtype), row_ends_E)

    @torch.no_grad()
    def merged_experts(self) -> GroupedExperts:
        """Plain :class:`GroupedExperts` computing what these adapted experts compute: ``W + s A B`` per expert, in the
        base's dtype (a quantised base is dequantised to float32 first)."""
        if isinstance(self.base, QuantizedExperts):
            w_in_EDH, w_down_EFD = self.base.dequantized_weights()
        else:
            w_in_EDH, w_down_EFD = self.base.w_in_EDH, self.base.w_down_EFD
        delta_in_EDH = self.scaling * torch.bmm(self.lora_in_A_EDR, self.lora_in_B_ERH)
        delta_down_EFD = self.scaling * torch.bmm(self.lora_down_A_EFR, self.lora_down_B_ERD)
        return plain_experts_like(
            self.base,
            (w_in_EDH.float() + delta_in_EDH).to(w_in_EDH.dtype),
            (w_down_EFD.float() + delta_down_EFD).to(w_down_EFD.dtype),
        ).train(self.training)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, implementation={self.implementation!r}"


def check_rank_alpha(rank: int, alpha: float) -> None:
    """Raise unless a LoRA ``rank`` and scale ``alpha`` can be used."""
    if rank < 1 or alpha <= 0:
        raise ValueError(f"rank must be >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
