"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a fixed token-id -> experts map.

Shape legend: T tokens, D model dim, E experts, K experts per token, N routed rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_lightning.routing.base import Router, Routing, routing_from_topk
from moe_lightning.routing.topk import check_num_experts_per_token

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """Bijective 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values in [0, 2**32).

    Both multipliers are below 2**31, so every product stays below 2**63: int64 never overflows and the
    result is the same on every device and machine.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


class HashRouter(Router):
    """Send every token id to ``num_experts_per_token`` fixed experts; no parameters, nothing learned.

    The experts of a token are the K largest of E hashes of ``(token id, seed, expert)``: a uniformly random
    K-subset per id, distinct by construction (the hash is a bijection), a pure function of the id and the
    seed, and reproducible across processes and machines (integer arithmetic only, no Python ``hash()``).
    Any int64 id works; only its low 32 bits are used. Each row weighs ``1 / K``.

    There is no learned score: ``logits_TE`` are zeros and ``probs_TE`` is the assignment itself (``1 / K``
    on the chosen experts), so the balance losses measure the hash's load and carry no gradient.

    Args:
        dim: model dimension D (the input is only used for its shape and device).
        num_experts: number of experts E.
        num_experts_per_token: K, any value in ``[1, E]``.
        seed: selects the mapping; routers with the same seed route identically.
        load_balance_coef, z_loss_coef, seq_aux_coef: see :class:`Router`.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        num_experts_per_token: int = 1,
        seed: int = 0,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        seq_aux_coef: float = 0.0,
    ) -> None:
        super().__init__(dim, num_experts, load_balance_coef, z_loss_coef, seq_aux_coef)
        check_num_experts_per_token(num_experts, num_experts_per_token)
        self.k = num_experts_per_token
        self.seed = seed

    @property
    def num_experts_per_token(self) -> int:
        return self.k

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        if token_ids_T is None:
            raise ValueError(
                "HashRouter routes by token id, so it needs token ids: call MoELayer with token_ids= "
                "(MoETransformer passes its input_ids automatically)"
            )
        if token_ids_T.shape != (x_TD.shape[0],):
            raise ValueError(f"token_ids_T must have shape ({x_TD.shape[0]},), got {tuple(token_ids_T.shape)}")
        if token_ids_T.is_floating_point() or token_ids_T.is_complex():
            raise TypeError(f"token_ids_T must be an integer tensor, got dtype={token_ids_T.dtype}")
        device = x_TD.device
        ids_T = token_ids_T.to(device=device, dtype=torch.long) & _MASK32
        seed_key = _mix32(torch.tensor(self.seed & _MASK32, device=device))
        expert_key_E = _mix32(torch.arange(self.num_experts, device=device))
        hash_TE = _mix32(_mix32(ids_T ^ seed_key).unsqueeze(-1) ^ expert_key_E)
        expert_idx_TK = hash_TE.topk(self.k, dim=-1).indices

        num_tokens = x_TD.shape[0]
        weight_TK = torch.full((num_tokens, self.k), 1.0 / self.k, device=device)
        probs_TE = torch.zeros(num_tokens, self.num_experts, device=device).scatter_(1, expert_idx_TK, weight_TK)
        logits_TE = torch.zeros(num_tokens, self.num_experts, device=device)
        return routing_from_topk(logits_TE, probs_TE, expert_idx_TK, weight_TK)
