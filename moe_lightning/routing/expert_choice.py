"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Shape legend: T tokens, D model dim, E experts, C capacity (tokens per expert), N routed rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moe_lightning.routing.base import Router, Routing
from moe_lightning.routing.numerics import RouterNumerics, topk_indices


class ExpertChoiceRouter(Router):
    """Each expert picks its ``C = ceil(capacity_factor * T / E)`` best-scoring tokens (at most T).

    Scores are the softmax over experts of the router logits (in the ``numerics`` precision); a row's combine
    weight is the token's score for the expert that picked it, and of equally scored tokens an expert takes the
    earlier. Every expert is exactly full, so nothing is ever dropped, but a token may be picked by several
    experts or by none (it then only passes through the residual).

    Caveat: an expert ranks all T tokens of the batch at once, so in a causal language model a token's
    routing depends on later tokens of its sequence (and on other sequences of the batch). Training thus
    sees information that autoregressive decoding cannot; the paper leaves this open.

    Args:
        dim: model dimension D.
        num_experts: number of experts E.
        capacity_factor: average number of experts per token; ``C`` is rounded up and clamped to T, so ``inf``
            (``.inf`` in YAML) sends every token to every expert.
        load_balance_coef, z_loss_coef, seq_aux_coef, numerics: see :class:`Router`; the load is balanced by
            construction, so only the z-loss is usually useful.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        capacity_factor: float = 1.0,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        seq_aux_coef: float = 0.0,
        numerics: RouterNumerics | None = None,
    ) -> None:
        super().__init__(dim, num_experts, load_balance_coef, z_loss_coef, seq_aux_coef, numerics)
        if not capacity_factor > 0:  # NaN fails too
            raise ValueError(f"capacity_factor must be > 0, got capacity_factor={capacity_factor}")
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)

    @property
    def num_experts_per_token(self) -> float:
        # Rows per token on average; a float is fine for the loss normalisation. C <= T caps it at E.
        return min(self.capacity_factor, self.num_experts)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes from a batch of ``num_tokens``."""
        if self.capacity_factor == math.inf:
            return num_tokens
        return min(math.ceil(self.capacity_factor * num_tokens / self.num_experts), num_tokens)

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        logits_TE = self.numerics.logits(x_TD, self.gate.weight)
        probs_TE = self.numerics.scores(logits_TE)
        capacity = self.capacity(x_TD.shape[0])

        token_idx_EC = topk_indices(probs_TE.detach().t(), capacity)
        expert_idx_EC = torch.arange(self.num_experts, device=x_TD.device).unsqueeze(-1).expand_as(token_idx_EC)
        token_idx_N = token_idx_EC.reshape(-1)
        expert_idx_N = expert_idx_EC.reshape(-1)
        return Routing(
            token_idx_N=token_idx_N,
            expert_idx_N=expert_idx_N,
            weight_N=probs_TE[token_idx_N, expert_idx_N],
            tokens_per_expert_E=torch.full((self.num_experts,), capacity, dtype=torch.long, device=x_TD.device),
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            num_dropped=torch.zeros((), dtype=torch.long, device=x_TD.device),
            num_requested=self.num_experts * capacity,
        )
