"""Soft MoE routing (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Every expert has S slots, each with a learned vector ``phi``. A slot's input is a convex combination of the tokens
of a group (dispatch weights: softmax over the group's tokens of the token-slot logits), every expert processes its
slots, and a token's output is a convex combination of all the group's slot outputs (combine weights: softmax over
the slots). Nothing is discrete: no token is dropped and every expert gets exactly its slots.

Groups, and causality. The paper mixes all tokens of one image; for a causal language model that would mix the
tokens of one sequence across positions, and every position would see the future (the paper leaves autoregressive
decoding open). Here a group is the tokens that share a position, one from each sequence of the batch: position l
mixes only tokens at position l, which attention has computed from positions <= l, so no future token reaches any
position. The price is that a token's output depends on the other sequences of its batch, which rules out
per-prompt generation (see :class:`SoftMoERouter`). For a non-causal encoder the paper's grouping is the same layer
applied to ``x.transpose(0, 1)``.

Shape legend: B sequences, L positions, D model dim, E experts, S slots per expert, X = E * S slots of a group,
T = B * L tokens, N routed rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from moe_lightning.routing.base import Router, Routing, routing_from_topk
from moe_lightning.routing.numerics import RouterNumerics

NORM_EPS = 1e-6
"""Added to the squared norm before the inverse square root of the l2 normalisation (as the paper's code)."""


@dataclass
class SoftRouting(Routing):
    """A :class:`Routing` whose rows are the per-token view of a soft mixing, plus the mixing weights themselves.

    The rows are what analytics and losses read: every token has one row per expert (``rows_per_token = E``, every
    expert T rows, nothing dropped), weighted by the share of the token's combine weights on that expert's slots.
    ``probs_TE`` is that share, ``logits_TE`` the logsumexp of each expert's slot logits (so that the softmax of the
    logits is the share). :class:`~moe_lightning.soft_layer.SoftMoELayer` computes with the mixing weights.
    """

    dispatch_LBX: Tensor | None = None
    """Slot ``x`` at position ``l`` takes ``sum_b dispatch_LBX[l, b, x] * token[b, l]``: a softmax over b (padding 0)."""
    combine_LBX: Tensor | None = None
    """Token ``(b, l)`` gives ``sum_x combine_LBX[l, b, x] * slot_output[l, x]``: a softmax over x."""


class SoftMoERouter(Router):
    """The dispatch and combine weights of soft MoE over groups of the tokens that share a position (module doc).

    The logits are ``scale * cos(token, phi_slot)``: tokens and slot vectors are l2-normalised and a learned scalar
    ``scale`` (initially 1) sets the sharpness, as in the paper, so that the logits do not grow with D and the
    softmaxes do not saturate into one-hot choices in large models.

    It runs only inside a :class:`~moe_lightning.soft_layer.SoftMoELayer` (:class:`MoETransformer` builds one for it),
    through :meth:`mix`: its decision is a mixing of tokens, which no list of token rows expresses, so calling it
    like a token-choice router raises. There are no balance losses: every expert processes exactly its slots.

    A token's output depends on the other sequences of its batch at its position, so generation refuses the router
    (``check_per_token_routing``), as it refuses expert choice: a prompt would decode differently in another batch.

    Args:
        dim: model dimension D.
        num_experts: number of experts E.
        slots_per_expert: S, slots each expert processes per position; the layer feeds each expert ``L * S`` rows.
            ``E * S`` near the batch size keeps one slot per token, as the paper does.
        numerics: the precision of the logits and weights (see :class:`RouterNumerics`); None: fp32.
    """

    def __init__(
        self, dim: int, num_experts: int, slots_per_expert: int = 1, numerics: RouterNumerics | None = None
    ) -> None:
        super().__init__(dim, num_experts, numerics=numerics)
        if isinstance(slots_per_expert, bool) or not isinstance(slots_per_expert, int) or slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be an integer >= 1, got slots_per_expert={slots_per_expert!r}")
        self.slots_per_expert = slots_per_expert
        # Expert-major, so that per-expert tools (dead-expert reinit) find E as the first dimension.
        self.phi_ESD = nn.Parameter(torch.randn(num_experts, slots_per_expert, dim) / dim**0.5)
        self.scale = nn.Parameter(torch.ones(()))

    @property
    def num_experts_per_token(self) -> int:
        # Every token's output mixes the slots of every expert.
        return self.num_experts

    @property
    def num_slots(self) -> int:
        """X = E * S, the slots of one group."""
        return self.num_experts * self.slots_per_expert

    def forward(self, *args, **kwargs) -> Routing:
        raise TypeError(
            "SoftMoERouter mixes tokens into slots, which no list of routed token rows expresses: it runs inside a "
            "SoftMoELayer (moe_lightning.soft_layer; MoETransformer builds one for it), which calls "
            "SoftMoERouter.mix, not in an MoELayer"
        )

    def logits(self, x_LBD: Tensor) -> Tensor:
        """``[L, B, X]``: ``scale * cos(token, phi)`` of every token and slot, in the numerics precision."""
        num_positions, batch, _ = x_LBD.shape
        phi_XD = self.phi_ESD.reshape(self.num_slots, self.dim)
        dot_TX = self.numerics.logits(x_LBD.reshape(-1, self.dim), phi_XD)
        # Normalising after the product gives the cosine in the logits' own precision whatever the model dtype.
        inv_norm_T = x_LBD.reshape(-1, self.dim).to(dot_TX.dtype).square().sum(-1).add(NORM_EPS).rsqrt()
        inv_norm_X = phi_XD.to(dot_TX.dtype).square().sum(-1).add(NORM_EPS).rsqrt()
        logits_TX = dot_TX * inv_norm_T[:, None] * (self.scale.to(dot_TX.dtype) * inv_norm_X)[None, :]
        return self.numerics.round(logits_TX).view(num_positions, batch, self.num_slots)

    def mix(self, x_BLD: Tensor, valid_BL: Tensor | None = None) -> SoftRouting:
        """The dispatch and combine weights of ``x_BLD``, and the per-token rows (see :class:`SoftRouting`).

        Args:
            x_BLD: the tokens, ``[batch, length, dim]``; the group of position l is ``x_BLD[:, l]``.
            valid_BL: True for real tokens; padding feeds no slot (its own output is computed but meaningless).
        """
        if x_BLD.dim() != 3 or x_BLD.shape[-1] != self.dim:
            raise ValueError(
                "SoftMoERouter mixes the tokens at each position across the batch, so it needs a "
                f"[batch, length, {self.dim}] input, got shape {tuple(x_BLD.shape)}"
            )
        if valid_BL is not None and valid_BL.shape != x_BLD.shape[:2]:
            raise ValueError(f"valid_BL must have shape {tuple(x_BLD.shape[:2])}, got {tuple(valid_BL.shape)}")
        batch, length, _ = x_BLD.shape
        logits_LBX = self.logits(x_BLD.transpose(0, 1))
        if valid_BL is None:
            dispatch_LBX = torch.softmax(logits_LBX, dim=1)
        else:
            # A finite fill, not -inf: a position that is padding in every sequence gets zeros, not NaN.
            valid_LB1 = valid_BL.t().unsqueeze(-1)
            masked_LBX = logits_LBX.masked_fill(~valid_LB1, torch.finfo(logits_LBX.dtype).min)
            dispatch_LBX = torch.softmax(masked_LBX, dim=1) * valid_LB1
        combine_LBX = torch.softmax(logits_LBX, dim=-1)

        # Per token: the logsumexp over each expert's slots, whose softmax over experts is the combine share.
        slot_logits_BLES = logits_LBX.transpose(0, 1).reshape(batch, length, self.num_experts, self.slots_per_expert)
        logits_TE = slot_logits_BLES.logsumexp(dim=-1).reshape(-1, self.num_experts)
        share_TE = combine_LBX.transpose(0, 1).reshape(-1, self.num_experts, self.slots_per_expert).sum(dim=-1)
        every_expert_TE = torch.arange(self.num_experts, device=x_BLD.device).expand(batch * length, -1)
        rows = routing_from_topk(logits_TE, share_TE, every_expert_TE, share_TE)
        return SoftRouting(
            **{f.name: getattr(rows, f.name) for f in fields(Routing)},
            dispatch_LBX=dispatch_LBX,
            combine_LBX=combine_LBX,
        )
