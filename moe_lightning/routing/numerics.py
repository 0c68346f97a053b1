"""Router numerics: the one setting for how every router computes its scores and picks among them.

Routing is a discrete choice made from nearly equal numbers, so a token whose best experts score within a rounding
error of each other can go to different experts under two arithmetics that both look right. Training and every
serving path (the engine, the compiled decoder, quantised and offloaded experts) run the model's own router
modules, so they share this setting by construction; this module says what the setting is.

Shape legend: T tokens, D model dim, E experts, K experts chosen per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from moe_lightning.kernels.router_gemm import router_logits

RouterDtype = Literal["float32", "float64", "bfloat16"]
ROUTER_DTYPES: tuple[str, ...] = get_args(RouterDtype)


@dataclass(frozen=True)
class RouterNumerics:
    """How a router computes its logits and scores, and how it breaks ties (``numerics=`` of every router).

    Tie-breaking is not a setting: among equal scores the lower expert index wins (for expert choice, the lower
    token index), on every device and at every batch size (:func:`topk_indices`). ``torch.topk`` promises no order
    among equal values and its kernels change with the tensor's size (of 64 equal scores the CPU picks 42 and 43;
    on an H200 it took the lower index in 637 of 4096 rows of 8 tied scores and in none of 256), so a one-token
    decode step and a training batch could break the same tie differently.

    In YAML, under a router's ``init_args``: ``numerics: {dtype: float64}``.
    """

    dtype: RouterDtype = "float32"
    """Precision of the router's logits, scores and choice, whatever the model's dtype or autocast state.
    ``float32`` (default): fp32 logits and scores. ``float64``: everything in fp64 (a reference for how many
    decisions fp32 rounding moves; the :class:`Routing` then carries fp64 logits, scores and weights).
    ``bfloat16``: logits and scores rounded to bf16 (the GEMM still accumulates in fp32), as a router computed in
    a bf16 model's dtype decides: to reproduce such a model; it makes many exact ties. The :class:`Routing` carries
    fp32 (bf16-valued) tensors then."""
    half_input_gemm: bool = True
    """Float32 and bfloat16 only. When the tokens and the router weight are both bf16 (or both fp16) on CUDA,
    compute the logits with one tensor-core GEMM on the half-precision inputs with fp32 accumulation
    (:mod:`moe_lightning.kernels.router_gemm`) instead of casting both to fp32 and multiplying in fp32. The inputs
    are exact either way and both accumulate in fp32; only the summation order differs (logits within 1e-5 of the
    largest). False: always cast first (one code path on every device, at the cost of fp32 copies)."""

    def __post_init__(self) -> None:
        if self.dtype not in ROUTER_DTYPES:
            raise ValueError(f"router numerics dtype must be one of {ROUTER_DTYPES}, got dtype={self.dtype!r}")
        if not isinstance(self.half_input_gemm, bool):
            raise TypeError(
                f"router numerics half_input_gemm must be a bool, got half_input_gemm={self.half_input_gemm!r}"
            )

    @classmethod
    def coerce(cls, value: RouterNumerics | Mapping[str, Any] | None) -> RouterNumerics:
        """``value`` as a :class:`RouterNumerics`: None is the default, a mapping (a router spec read back from
        JSON) gives the fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(
                    f"unknown router numerics fields {unknown}; the fields are {list(cls.__dataclass_fields__)}"
                )
            return cls(**value)
        raise TypeError(f"router numerics must be a RouterNumerics or a mapping of its fields, got {value!r}")

    def logits(self, x_TD: Tensor, weight_ED: Tensor) -> Tensor:
        """``x_TD @ weight_ED.T`` in this precision (fp64 for float64, else fp32 holding bf16 values for bfloat16)."""
        dtype = torch.float64 if self.dtype == "float64" else torch.float32
        return self.round(router_logits(x_TD, weight_ED, dtype, self.half_input_gemm))

    def scores(self, logits_TE: Tensor, score_func: Literal["softmax", "sigmoid"] = "softmax") -> Tensor:
        """Softmax over experts (or sigmoid) of ``logits_TE`` in this precision."""
        scores_TE = torch.softmax(logits_TE, dim=-1) if score_func == "softmax" else torch.sigmoid(logits_TE)
        return self.round(scores_TE)

    def round(self, t: Tensor) -> Tensor:
        """``t`` (fp32 or fp64) rounded to this precision, in its own dtype: a bfloat16 router rounds to bf16."""
        return t.to(torch.bfloat16).to(t.dtype) if self.dtype == "bfloat16" else t


def topk_indices(scores: Tensor, k: int, dim: int = -1) -> Tensor:
    """Indices of the ``k`` highest ``scores`` along ``dim``, best first; equal scores in increasing index order.

    A stable descending sort keeps equal scores in index order, which ``topk`` does not promise. On the CPU it costs
    two to five times ``topk`` (8 to 256 experts), still a small part of an MoE layer.
    """
    return scores.sort(dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
