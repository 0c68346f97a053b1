"""Balanced assignment routing with Sinkhorn (BASE layers, Lewis et al. 2021; S-BASE, Clark et al. 2022).

Shape legend: T tokens, D model dim, E experts, K experts per token, N routed rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_lightning.routing.base import Router, Routing
from moe_lightning.routing.numerics import RouterNumerics
from moe_lightning.routing.topk import check_num_experts_per_token, topk_routing


class SinkhornRouter(Router):
    """Token-choice top-k whose training-time selection is balanced by Sinkhorn iterations (S-BASE).

    In training, ``exp(logits)`` is scaled in log space, alternately per token (rows) and per expert
    (columns), toward a plan where every token carries equal mass and every expert receives ``T / E``; each
    token then takes its K best experts under that plan. Scaling a column cancels an expert's popularity,
    so the load evens out without an auxiliary loss. The plan is computed without gradient; the router
    learns through the combine weight, ``sigmoid(logit)`` of the chosen experts (not renormalised), as in
    S-BASE. In evaluation the selection is plain top-k over the logits with the same weights, so decoding
    does not depend on the other tokens of the batch.

    Args:
        dim: model dimension D.
        num_experts: number of experts E.
        num_experts_per_token: K, any value in ``[1, E]``.
        num_iterations: Sinkhorn row/column normalisation rounds (fixed, so the cost is predictable).
        load_balance_coef, z_loss_coef, seq_aux_coef, numerics: see :class:`Router`.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_experts_per_token: int = 1,
        num_iterations: int = 10,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        seq_aux_coef: float = 0.0,
        numerics: RouterNumerics | None = None,
    ) -> None:
        super().__init__(dim, num_experts, load_balance_coef, z_loss_coef, seq_aux_coef, numerics)
        check_num_experts_per_token(num_experts, num_experts_per_token)
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got num_iterations={num_iterations}")
        self.k = num_experts_per_token
        self.num_iterations = num_iterations
        self.gate = nn.Linear(dim, num_experts, bias=False)

    @property
    def num_experts_per_token(self) -> int:
        return self.k

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        logits_TE = self.numerics.logits(x_TD, self.gate.weight)
        probs_TE = self.numerics.scores(logits_TE, "sigmoid")
        selection_TE = None
        if self.training:
            selection_TE = self.numerics.round(sinkhorn_log_plan(logits_TE.detach(), self.num_iterations))
        return topk_routing(logits_TE, probs_TE, self.k, selection_TE, normalize_weights=False)


@torch.no_grad()
def sinkhorn_log_plan(logits_TE: Tensor, num_iterations: int) -> Tensor:
    """Log of the Sinkhorn-balanced transport plan of ``exp(logits_TE)``: rows sum to 1, columns to ``T / E``.

    Ends on a column step, so the expert marginals hold exactly; row steps never change a token's ranking.
    """
    num_tokens, num_experts = logits_TE.shape
    log_expert_mass = math.log(max(num_tokens, 1) / num_experts)
    log_plan_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))  # fp64 logits stay fp64
    for _ in range(num_iterations):
        log_plan_TE = log_plan_TE - log_plan_TE.logsumexp(dim=1, keepdim=True)
        log_plan_TE = log_plan_TE - log_plan_TE.logsumexp(dim=0, keepdim=True) + log_expert_mass
    return log_plan_TE
