"""The one routing contract: every router reduces its decision to a flat assignment list.

Shape legend: T tokens, D model dim, E experts, N routed rows (token, expert) pairs, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor, nn

from moe_lightning.routing import losses
from moe_lightning.routing.counting import count_per_bin
from moe_lightning.routing.numerics import RouterNumerics


@dataclass
class Routing:
    """What a router decided for one batch of tokens.

    Row ``n`` says: token ``token_idx_N[n]`` goes to expert ``expert_idx_N[n]`` and its output is scaled
    by ``weight_N[n]``. Rows come in no particular order; dispatchers sort them. A token may appear in
    zero rows (dropped, or unpicked under expert choice) or in several.
    """

    token_idx_N: Tensor
    """int64 index of the token (into the flattened ``[T, D]`` input) of each routed row."""
    expert_idx_N: Tensor
    """int64 expert of each routed row."""
    weight_N: Tensor
    """Combine weight of each routed row (dtype of ``probs_TE``, differentiable)."""
    tokens_per_expert_E: Tensor
    """int64 number of rows per expert; sums to N."""
    logits_TE: Tensor
    """Router logits (before softmax / sigmoid) in the router's :class:`RouterNumerics` precision: fp32 (holding
    bf16 values for a bfloat16 router) or fp64."""
    probs_TE: Tensor
    """Router scores (softmax or sigmoid of the logits) that the weights come from, in the logits' dtype."""
    num_dropped: Tensor
    """int64 scalar: rows the router wanted but dropped for capacity (0 when dropless)."""
    num_requested: int
    """Rows the router would have produced without capacity limits (for the dropped fraction)."""
    rows_per_token: int | None = None
    """K when every token has exactly K rows stored token-major (row ``n`` belongs to token ``n // K``), as
    dropless top-k routing produces; None otherwise. Dispatchers use it for a sort-free combine."""
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    """Weighted auxiliary losses (coefficient already applied), ready to be added to the task loss."""

    @property
    def num_tokens(self) -> int:
        return self.logits_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[1]

    @property
    def dropped_fraction(self) -> Tensor:
        return self.num_dropped.float() / max(self.num_requested, 1)

    def detach(self) -> Routing:
        """A copy cut from the autograd graph, for statistics kept after the backward pass."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return replace(
            self,
            **{name: value.detach() for name, value in tensors.items()},
            aux_losses={name: value.detach() for name, value in self.aux_losses.items()},
        )


class Router(nn.Module):
    """Base class of all routers.

    Subclasses implement :meth:`route`, which turns tokens into a :class:`Routing` without auxiliary
    losses; :meth:`forward` then adds the losses whose coefficient is non-zero, so every router shares
    the same loss code and configuration.

    Args:
        dim: model (token) dimension D.
        num_experts: number of experts E.
        load_balance_coef: weight of the Switch/GShard load-balancing loss.
        z_loss_coef: weight of the router z-loss (ST-MoE).
        seq_aux_coef: weight of the sequence-level balance loss (DeepSeek-V3); needs the sequence length.
        numerics: the precision of the logits and scores (see :class:`RouterNumerics`); None: fp32. A mapping of
            its fields is accepted too (a router spec read back from JSON).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        seq_aux_coef: float = 0.0,
        numerics: RouterNumerics | None = None,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got dim={dim}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got num_experts={num_experts}")
        for name, value in (
            ("load_balance_coef", load_balance_coef),
            ("z_loss_coef", z_loss_coef),
            ("seq_aux_coef", seq_aux_coef),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {name}={value}")
        self.dim = dim
        self.num_experts = num_experts
        self.load_balance_coef = load_balance_coef
        self.z_loss_coef = z_loss_coef
        self.seq_aux_coef = seq_aux_coef
        self.numerics = RouterNumerics.coerce(numerics)

    @property
    def num_experts_per_token(self) -> float:
        """Average rows per token, used for the load-balancing normalisation."""
        return 1

    def route(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        raise NotImplementedError

    def forward(
        self,
        x_TD: Tensor,
        token_ids_T: Tensor | None = None,
        valid_mask_T: Tensor | None = None,
        sequence_length: int | None = None,
    ) -> Routing:
        """Route ``x_TD``.

        Args:
            x_TD: flattened tokens.
            token_ids_T: input token ids, needed by token-id routers such as :class:`HashRouter`.
            valid_mask_T: True for real tokens, False for padding; padding is left out of the balance losses.
            sequence_length: tokens per sequence when ``x_TD`` is a flattened ``[B, L, D]`` batch; needed by
                the sequence-level loss.
        """
        if x_TD.dim() != 2 or x_TD.shape[1] != self.dim:
            raise ValueError(f"router expects [tokens, {self.dim}] input, got shape {tuple(x_TD.shape)}")
        routing = self.route(x_TD, token_ids_T)
        routing.aux_losses = self._aux_losses(routing, valid_mask_T, sequence_length)
        return routing

    def _aux_losses(
        self, routing: Routing, valid_mask_T: Tensor | None, sequence_length: int | None
    ) -> dict[str, Tensor]:
        if not self.training:
            return {}
        aux: dict[str, Tensor] = {}
        k = self.num_experts_per_token
        if self.load_balance_coef > 0:
            aux["load_balance"] = self.load_balance_coef * losses.load_balancing_loss(routing, k, valid_mask_T)
        if self.z_loss_coef > 0:
            aux["z_loss"] = self.z_loss_coef * losses.router_z_loss(routing.logits_TE, valid_mask_T)
        if self.seq_aux_coef > 0:
            if sequence_length is None:
                raise ValueError(
                    "seq_aux_coef > 0 needs the sequence length: call the MoELayer with a [batch, length, dim] input"
                )
            aux["seq_aux"] = self.seq_aux_coef * losses.sequence_aux_loss(routing, k, sequence_length, valid_mask_T)
        return aux


def routing_from_topk(
    logits_TE: Tensor, probs_TE: Tensor, expert_idx_TK: Tensor, weight_TK: Tensor
) -> Routing:
    """Flatten a dense ``[T, K]`` top-k choice into the flat routing contract (no drops)."""
    num_tokens, k = expert_idx_TK.shape
    token_idx_N = torch.arange(num_tokens, device=expert_idx_TK.device).repeat_interleave(k)
    expert_idx_N = expert_idx_TK.reshape(-1)
    return Routing(
        token_idx_N=token_idx_N,
        expert_idx_N=expert_idx_N,
        weight_N=weight_TK.reshape(-1),
        tokens_per_expert_E=count_per_bin(expert_idx_N, logits_TE.shape[1]),
        logits_TE=logits_TE,
        probs_TE=probs_TE,
        num_dropped=torch.zeros((), dtype=torch.long, device=logits_TE.device),
        num_requested=num_tokens * k,
        rows_per_token=k,
    )
