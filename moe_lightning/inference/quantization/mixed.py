"""MixedPrecisionExperts: the routed experts of a layer, each in its own format (bf16, int8, NF4 blocks, ...).

A drop-in replacement for :class:`GroupedExperts`, as :class:`QuantizedExperts` is, for layers where a serving plan
(:mod:`moe_lightning.inference.plan`) keeps the hot experts in more bits than the cold ones. The experts of one format
share one pair of matrix stores (``w_in[format]``, ``w_down[format]``), so a layer holds each format's code tables
once and an expert costs exactly what it would in a layer of that format alone.

Shape legend: N matrix rows (out features), K matrix columns (in features), E experts (G of them in one format),
D model dim, F expert hidden dim, H input-projection width (2F for SwiGLU, F for GELU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from moe_lightning.experts.activations import Activation, check_activation, input_width
from moe_lightning.experts.grouped import GroupedExperts
from moe_lightning.inference.quantization.config import QuantizationConfig
from moe_lightning.inference.quantization.experts import per_expert_forward
from moe_lightning.inference.quantization.formats import format_configs
from moe_lightning.inference.quantization.matrices import QuantizedMatrices

class BFloat16Matrices(nn.Module):
    """E matrices ``[N, K]`` kept in bfloat16, with :class:`QuantizedMatrices`' interface (``matmul``, ``dequantize``,
    ``quantize_``); ``.to(dtype)`` moves but never recasts them, so they keep the bytes a plan counted."""

    def __init__(self, num_matrices: int, out_features: int, in_features: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_matrices, self.out_features, self.in_features = num_matrices, out_features, in_features
        self.register_buffer("weight_ENK", torch.zeros(num_matrices, out_features, in_features, dtype=torch.bfloat16,
                                                       device=device))

    @torch.no_grad()
    def quantize_(self, w_ENK: Tensor) -> BFloat16Matrices:
        """Replace the stored matrices by ``w_ENK`` rounded to bfloat16; returns ``self``."""
        if tuple(w_ENK.shape) != tuple(self.weight_ENK.shape):
            raise ValueError(f"quantize_ expects matrices of shape {tuple(self.weight_ENK.shape)}, got "
                             f"{tuple(w_ENK.shape)}")
        self.weight_ENK = w_ENK.detach().to(device=self.weight_ENK.device, dtype=torch.bfloat16).contiguous()
        return self

    def dequantize(self, e: int) -> Tensor:
        return self.weight_ENK[e].float()

    def matmul(self, x_MK: Tensor, e: int) -> Tensor:
        return x_MK @ self.weight_ENK[e].to(x_MK.dtype).T

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> BFloat16Matrices:
        self.weight_ENK = self.weight_ENK.to(fn(self.weight_ENK).device)
        return self


class MixedPrecisionExperts(nn.Module):
    """E MLP experts, expert ``e`` stored in format ``expert_formats[e]``: ``bf16`` or a quantised format's name
    (see :mod:`moe_lightning.inference.quantization.formats`; the name is all a saved file records).

    ``forward`` loops over the experts with rows, each through its own format's matmul (see
    :func:`per_expert_forward`). Build one from trained experts with :meth:`from_experts`; the constructor makes an
    empty one of the right shapes, into which a saved state is loaded.

    Args:
        num_experts: E.
        dim: model dimension D.
        hidden_dim: expert hidden dimension F.
        activation: ``"swiglu"`` or ``"gelu"``.
        expert_formats: one format name per expert.
        device: where to allocate the buffers.
    """

    def __init__(
        self, num_experts: int, dim: int, hidden_dim: int, activation: Activation, expert_formats: Sequence[str],
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_activation(activation)
        if len(expert_formats) != num_experts:
            raise ValueError(f"expert_formats must name one format per expert ({num_experts}), got "
                             f"{len(expert_formats)}: {list(expert_formats)}")
        self.num_experts, self.dim, self.hidden_dim, self.activation = num_experts, dim, hidden_dim, activation
        self.expert_formats = list(expert_formats)
        used = list(dict.fromkeys(self.expert_formats))
        self.formats = format_configs(used)
        members = {name: [e for e, f in enumerate(self.expert_formats) if f == name] for name in used}
        # Expert e is matrix _index_E[e] of its format's stores.
        self._index_E = [members[f].index(e) for e, f in enumerate(self.expert_formats)]
        width = input_width(activation, hidden_dim)
        self.w_in = nn.ModuleDict({name: _matrices(self.formats[name], len(members[name]), width, dim, device)
                                   for name in used})
        self.w_down = nn.ModuleDict({name: _matrices(self.formats[name], len(members[name]), dim, hidden_dim, device)
                                     for name in used})

    @classmethod
    def from_experts(cls, experts: GroupedExperts, expert_formats: Sequence[str]) -> MixedPrecisionExperts:
        """``experts`` (on their device), expert ``e`` quantised to ``expert_formats[e]``."""
        if not isinstance(experts, GroupedExperts):
            raise TypeError(f"from_experts needs GroupedExperts, got {type(experts).__name__}")
        mixed = cls.empty_like(experts, expert_formats)
        for name in mixed.formats:
            members = [e for e, f in enumerate(mixed.expert_formats) if f == name]
            mixed.w_in[name].quantize_(experts.w_in_EDH[members].transpose(1, 2))
            mixed.w_down[name].quantize_(experts.w_down_EFD[members].transpose(1, 2))
        return mixed.train(experts.training)

    @classmethod
    def empty_like(cls, experts: GroupedExperts, expert_formats: Sequence[str]) -> MixedPrecisionExperts:
        """An empty (all-zero) stand-in of ``experts``' shapes, to load a saved state into."""
        return cls(experts.num_experts, experts.dim, experts.hidden_dim, experts.activation, expert_formats,
                   device=experts.w_in_EDH.device)

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        return per_expert_forward(x_ND, tokens_per_expert_E, self.num_experts, self.dim, self.activation,
                                  self._matrices_of)

    def _matrices_of(self, e: int) -> tuple[nn.Module, nn.Module, int]:
        name = self.expert_formats[e]
        return self.w_in[name], self.w_down[name], self._index_E[e]

    def dequantized_weights(self) -> tuple[Tensor, Tensor]:
        """``(w_in_EDH, w_down_EFD)`` as float32 in :class:`GroupedExperts`' layout: the weights this module computes
        with (int8 experts also quantise their activations, which these do not show)."""
        w_in, w_down = zip(*(
            (w_in.dequantize(index).T, w_down.dequantize(index).T)
            for w_in, w_down, index in map(self._matrices_of, range(self.num_experts))
        ))
        return torch.stack(w_in), torch.stack(w_down)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation!r}, expert_formats={self.expert_formats}")


def _matrices(config: QuantizationConfig | None, num_matrices: int, out_features: int, in_features: int,
              device: torch.device | str | None) -> nn.Module:
    if config is None:
        return BFloat16Matrices(num_matrices, out_features, in_features, device)
    return QuantizedMatrices(num_matrices, out_features, in_features, config, device)
