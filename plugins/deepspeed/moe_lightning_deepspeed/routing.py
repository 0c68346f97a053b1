"""A :class:`~moe_lightning.Routing` from DeepSpeed's ``TopKGate`` outputs, so analytics and callbacks read
DeepSpeed-MoE layers as they read ours.

Shape legend: T tokens, E experts, K experts per token, N routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.routing import Routing


def routing_from_gate(
    logits_TE: Tensor, expert_idx_KT: Tensor, weight_KT: Tensor, l_aux: Tensor, load_balance_coef: float,
) -> Routing:
    """The routing of one ``TopKGate`` call with ``sparse_routes=True``.

    Args:
        logits_TE: the gate's logits (``wg`` applied to the fp32 tokens).
        expert_idx_KT: the gate's ``indices``: the k-th expert of each token, ``-1`` where capacity dropped it.
        weight_KT: the gate's ``gates``: the combine weight of each of them.
        l_aux: the gate's GShard balance loss; it becomes ``aux_losses["load_balance"]`` times ``load_balance_coef``.
    """
    num_experts = logits_TE.shape[1]
    k, num_tokens = expert_idx_KT.shape
    expert_idx_TK = expert_idx_KT.t().long()
    kept_TK = expert_idx_TK >= 0
    token_idx_TK = torch.arange(num_tokens, device=logits_TE.device).unsqueeze(1).expand(-1, k)
    expert_idx_N = expert_idx_TK[kept_TK]
    num_dropped = (~kept_TK).sum()
    return Routing(
        token_idx_N=token_idx_TK[kept_TK],
        expert_idx_N=expert_idx_N,
        weight_N=weight_KT.t()[kept_TK].to(logits_TE.dtype),
        tokens_per_expert_E=torch.bincount(expert_idx_N, minlength=num_experts),
        logits_TE=logits_TE,
        probs_TE=torch.softmax(logits_TE, dim=-1),
        num_dropped=num_dropped,
        num_requested=num_tokens * k,
        # Token-major with K rows each when nothing was dropped: the dispatchers' sort-free path.
        rows_per_token=k if int(num_dropped) == 0 else None,
        aux_losses={"load_balance": load_balance_coef * l_aux} if load_balance_coef else {},
    )
