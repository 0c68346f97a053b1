"""Attention-based routing: tokens query learned expert keys, then token-choice top-k.

Shape legend: T tokens, D model dim, E experts, H heads, Dh head dim, K experts per token, N routed rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_lightning.routing.base import Router, Routing
from moe_lightning.routing.numerics import RouterNumerics
from moe_lightning.routing.topk import check_num_experts_per_token, topk_routing


class AttentionRouter(Router):
    """Score experts by multi-head scaled dot-product attention between tokens and learned expert keys.

    Each token is projected to ``H`` queries of size ``Dh``; each expert has one learned key per head. The
    expert logits are the per-head scores ``q . k / sqrt(Dh)`` averaged over heads, computed in the ``numerics``
    precision. Then, as in :class:`TopKRouter`, the softmax over experts gives the probabilities and each token
    takes its ``num_experts_per_token`` best experts.

    Args:
        dim: model dimension D.
        num_experts: number of experts E.
        num_experts_per_token: K, any value in ``[1, E]``.
        num_heads: number of query/key heads H.
        head_dim: Dh; ``None`` means ``dim // num_heads`` (then ``dim`` must be divisible by ``num_heads``).
        normalize_weights: rescale the K chosen weights of a token to sum to one.
        load_balance_coef, z_loss_coef, seq_aux_coef, numerics: see :class:`Router`.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_experts_per_token: int = 2,
        num_heads: int = 4,
        head_dim: int | None = None,
        normalize_weights: bool = True,
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        seq_aux_coef: float = 0.0,
        numerics: RouterNumerics | None = None,
    ) -> None:
        super().__init__(dim, num_experts, load_balance_coef, z_loss_coef, seq_aux_coef, numerics)
        check_num_experts_per_token(num_experts, num_experts_per_token)
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got num_heads={num_heads}")
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(
                    f"dim must be divisible by num_heads when head_dim is None, got dim={dim} and num_heads={num_heads}"
                )
            head_dim = dim // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got head_dim={head_dim}")
        self.k = num_experts_per_token
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.normalize_weights = normalize_weights
        self.query = nn.Linear(dim, num_heads * head_dim, bias=False)
        # Unit-variance keys: after the 1/sqrt(Dh) scaling, each head's initial score has the variance of a
        # plain linear gate's logit.
        self.expert_keys_HEDh = nn.Parameter(torch.randn(num_heads, num_experts, head_dim))

    @property
    def num_experts_per_token(self) -> int:
        return self.k

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        # The query projection is the router's autocast-free linear map; the scores stay in its dtype as well.
        query_THDh = self.numerics.logits(x_TD, self.query.weight).view(-1, self.num_heads, self.head_dim)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            score_THE = torch.einsum("thd,hed->the", query_THDh, self.expert_keys_HEDh.to(query_THDh.dtype))
        logits_TE = self.numerics.round(score_THE.mean(dim=1) / math.sqrt(self.head_dim))
        probs_TE = self.numerics.scores(logits_TE)
        return topk_routing(logits_TE, probs_TE, self.k, normalize_weights=self.normalize_weights)
