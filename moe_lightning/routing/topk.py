"""Token-choice top-k routing (Switch, GShard, Mixtral, DeepSeek-V3, Qwen3-MoE, OLMoE).

Shape legend: T tokens, D model dim, E experts, G expert groups, K experts per token, N routed rows.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from moe_lightning.routing.base import Router, Routing, routing_from_topk
from moe_lightning.routing.counting import count_per_bin
from moe_lightning.routing.losses import expert_bias_step
from moe_lightning.routing.numerics import RouterNumerics, topk_indices


class TopKRouter(Router):
    """Each token picks its ``num_experts_per_token`` best-scoring experts.

    Args:
        dim: model dimension D.
        num_experts: number of experts E.
        num_experts_per_token: K, any value in ``[1, E]``.
        score_func: ``"softmax"`` (Mixtral, Qwen) or ``"sigmoid"`` (DeepSeek-V3), in the ``numerics`` precision.
        normalize_weights: rescale the K chosen weights of a token to sum to one.
        routed_scaling_factor: multiplies the combine weights (DeepSeek-V3 uses 2.5).
        jitter_eps: in training, multiply the router input by noise drawn from ``U(1 - eps, 1 + eps)``.
        capacity_factor: if set, each expert keeps at most ``ceil(capacity_factor * T * K / E)`` rows in
            training and the rest are dropped; ``None`` is dropless, and so is ``float("inf")`` (``.inf`` in YAML),
            which is stored as None.
        eval_capacity_factor: the same for evaluation; ``None`` reuses ``capacity_factor`` (so ``inf`` is how a
            capacity-limited router evaluates dropless).
        drop_policy: which rows an over-full expert drops: ``"probability"`` keeps the highest-scoring,
            ``"position"`` keeps first choices before second choices, earlier tokens first.
        expert_bias: keep a per-expert bias added to the scores for selection only (aux-loss-free
            balancing); it is updated by :meth:`update_expert_bias`, never by the optimizer.
        bias_update_rate: the sign-step size of that update.
        num_expert_groups: split the experts into this many groups for group-limited routing.
        num_groups_per_token: each token chooses experts from only this many groups (ranked by the sum
            of their two best scores).
        load_balance_coef, z_loss_coef, seq_aux_coef, numerics: see :class:`Router`.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_experts_per_token: int = 2,
        score_func: Literal["softmax", "sigmoid"] = "softmax",
        normalize_weights: bool = True,
        routed_scaling_factor: float = 1.0,
        jitter_eps: float = 0.0,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        drop_policy: Literal["probability", "position"] = "probability",
        expert_bias: bool = False,
        bias_update_rate: float = 1e-3,
        num_expert_groups: int = 1,
        num_groups_per_token: int = 1,
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        seq_aux_coef: float = 0.0,
        numerics: RouterNumerics | None = None,
    ) -> None:
        super().__init__(dim, num_experts, load_balance_coef, z_loss_coef, seq_aux_coef, numerics)
        _validate_topk(num_experts, num_experts_per_token, num_expert_groups, num_groups_per_token)
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got score_func={score_func!r}")
        if drop_policy not in ("probability", "position"):
            raise ValueError(f"drop_policy must be 'probability' or 'position', got drop_policy={drop_policy!r}")
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if value is not None and not value > 0:  # NaN fails too
                raise ValueError(f"{name} must be > 0 (or None or inf for dropless), got {name}={value}")
        if not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got jitter_eps={jitter_eps}")
        if bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got bias_update_rate={bias_update_rate}")
        self.k = num_experts_per_token
        self.score_func = score_func
        self.normalize_weights = normalize_weights
        self.routed_scaling_factor = routed_scaling_factor
        self.jitter_eps = jitter_eps
        # inf is stored as None, so `capacity_factor is None` means dropless wherever it is read.
        self.capacity_factor = _dropless_as_none(capacity_factor)
        self.eval_capacity_factor = _dropless_as_none(
            capacity_factor if eval_capacity_factor is None else eval_capacity_factor
        )
        self.drop_policy = drop_policy
        self.bias_update_rate = bias_update_rate
        self.num_expert_groups = num_expert_groups
        self.num_groups_per_token = num_groups_per_token
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts) if expert_bias else None)
        # Rows per expert since the last bias update, summed over the micro-batches of one optimizer step.
        load_E = torch.zeros(num_experts, dtype=torch.long) if expert_bias else None
        self.register_buffer("expert_load_E", load_E, persistent=False)

    @property
    def num_experts_per_token(self) -> int:
        return self.k

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        if self.training and self.jitter_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
        logits_TE = self.numerics.logits(x_TD, self.gate.weight)
        probs_TE = self.numerics.scores(logits_TE, self.score_func)

        selection_TE = probs_TE.detach()
        if self.expert_bias_E is not None:
            selection_TE = self.numerics.round(selection_TE + self.expert_bias_E)
        if self.num_expert_groups > 1:
            selection_TE = self._mask_unselected_groups(selection_TE)
        routing = topk_routing(
            logits_TE, probs_TE, self.k, selection_TE, self.normalize_weights, self.routed_scaling_factor
        )
        # A factor set after construction (by a capacity-tuning callback, say) may be inf as well.
        capacity_factor = _dropless_as_none(self.capacity_factor if self.training else self.eval_capacity_factor)
        if capacity_factor is not None:
            capacity = math.ceil(capacity_factor * x_TD.shape[0] * self.k / self.num_experts)
            routing = drop_over_capacity(routing, capacity, self.drop_policy, self.k)
        if self.training and self.expert_load_E is not None:
            self.expert_load_E += routing.tokens_per_expert_E
        return routing

    def _mask_unselected_groups(self, scores_TE: Tensor) -> Tensor:
        num_tokens = scores_TE.shape[0]
        scores_TGe = scores_TE.view(num_tokens, self.num_expert_groups, -1)
        best_two = min(2, scores_TGe.shape[-1])
        group_score_TG = scores_TGe.topk(best_two, dim=-1).values.sum(dim=-1)
        group_idx = topk_indices(group_score_TG, self.num_groups_per_token)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx, True)
        return scores_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(num_tokens, -1)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: Tensor | None = None) -> None:
        """Apply one sign step to the selection bias and restart the load count.

        Call once per optimizer step, before it. ``tokens_per_expert_E`` defaults to the load this router
        counted since the last call; pass the sum over data-parallel ranks when training distributed.
        """
        if self.expert_bias_E is None:
            raise RuntimeError("update_expert_bias() needs a router built with expert_bias=True")
        load_E = self.expert_load_E if tokens_per_expert_E is None else tokens_per_expert_E
        expert_bias_step(self.expert_bias_E, load_E, self.bias_update_rate)
        self.expert_load_E.zero_()


def _dropless_as_none(capacity_factor: float | None) -> float | None:
    """None for a dropless capacity factor (None or inf), else the factor."""
    return None if capacity_factor == math.inf else capacity_factor


def check_num_experts_per_token(num_experts: int, k: int) -> None:
    """Raise if ``k`` experts per token cannot be picked from ``num_experts``."""
    if not 1 <= k <= num_experts:
        raise ValueError(f"num_experts_per_token must be in [1, num_experts], got top_k={k} and num_experts={num_experts}")


def _validate_topk(num_experts: int, k: int, num_groups: int, groups_per_token: int) -> None:
    check_num_experts_per_token(num_experts, k)
    if num_groups < 1 or num_experts % num_groups != 0:
        raise ValueError(
            f"num_expert_groups must divide num_experts, got num_expert_groups={num_groups} and num_experts={num_experts}"
        )
    if num_groups > 1:
        if not 1 <= groups_per_token <= num_groups:
            raise ValueError(
                f"num_groups_per_token must be in [1, num_expert_groups], got num_groups_per_token={groups_per_token}"
                f" and num_expert_groups={num_groups}"
            )
        reachable = groups_per_token * (num_experts // num_groups)
        if k > reachable:
            raise ValueError(
                f"num_experts_per_token={k} exceeds the {reachable} experts reachable in num_groups_per_token="
                f"{groups_per_token} groups of {num_experts // num_groups}"
            )


def topk_routing(
    logits_TE: Tensor,
    probs_TE: Tensor,
    k: int,
    selection_TE: Tensor | None = None,
    normalize_weights: bool = True,
    scaling_factor: float = 1.0,
) -> Routing:
    """Each token takes the ``k`` experts with the highest ``selection_TE`` (default: ``probs_TE``), best first,
    equal scores to the lower expert index (:func:`topk_indices`).

    The combine weights are the chosen ``probs_TE`` entries, optionally rescaled to sum to one per token,
    times ``scaling_factor``. Selection never carries gradients; the weights do.
    """
    selection_TE = probs_TE.detach() if selection_TE is None else selection_TE
    expert_idx_TK = topk_indices(selection_TE, k)
    weight_TK = probs_TE.gather(1, expert_idx_TK)
    if normalize_weights:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return routing_from_topk(logits_TE, probs_TE, expert_idx_TK, weight_TK * scaling_factor)


def drop_over_capacity(routing: Routing, capacity: int, policy: str, k: int) -> Routing:
    """Keep at most ``capacity`` rows per expert; rows are ranked by ``policy`` (see :class:`TopKRouter`)."""
    num_rows = routing.expert_idx_N.shape[0]
    if policy == "position":
        # Rows are token-major (t * K + k); rank all first choices before second choices, earlier tokens first.
        priority_N = torch.arange(num_rows, device=routing.expert_idx_N.device).view(-1, k).t().reshape(-1)
    else:
        priority_N = routing.weight_N.detach().argsort(descending=True, stable=True)
    expert_by_priority_N = routing.expert_idx_N[priority_N]
    by_expert_N = expert_by_priority_N.argsort(stable=True)
    counts_E = routing.tokens_per_expert_E
    starts_E = counts_E.cumsum(0) - counts_E
    rank_in_expert_N = torch.arange(num_rows, device=counts_E.device) - starts_E[expert_by_priority_N[by_expert_N]]
    keep_N = torch.empty(num_rows, dtype=torch.bool, device=counts_E.device)
    keep_N[priority_N[by_expert_N]] = rank_in_expert_N < capacity

    expert_idx_N = routing.expert_idx_N[keep_N]
    routing.token_idx_N = routing.token_idx_N[keep_N]
    routing.expert_idx_N = expert_idx_N
    routing.weight_N = routing.weight_N[keep_N]
    routing.tokens_per_expert_E = count_per_bin(expert_idx_N, routing.num_experts)
    routing.num_dropped = num_rows - keep_N.sum()
    routing.rows_per_token = None
    return routing
