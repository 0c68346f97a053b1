"""MoELayer: router + dispatcher + experts (+ shared experts). Plain PyTorch, usable in any model.

Shape legend: T tokens, D model dim.
"""

from __future__ import annotations

from torch import Tensor, nn

from moe_lightning.dispatch.local import LocalDispatcher
from moe_lightning.routing.base import Router, Routing


class MoELayer(nn.Module):
    """A drop-in Mixture-of-Experts feed-forward block.

    ``forward(x)`` takes any ``[..., D]`` tensor and returns ``(y, routing)``: ``y`` has the shape of ``x``,
    and ``routing`` (a :class:`Routing`) carries the decision and the weighted auxiliary losses, which the
    caller adds to its loss (``sum(routing.aux_losses.values())``).

    Token-id routers (:class:`HashRouter`) need ``token_ids`` of shape ``x.shape[:-1]``; pass
    ``padding_mask`` (True for real tokens) to keep padding out of the balance losses.

    Args:
        router: any :class:`Router`.
        experts: the routed experts, e.g. :class:`GroupedExperts`; called as ``experts(x_ND, tokens_per_expert_E)``.
        shared_experts: optional dense module every token also passes through, e.g. :class:`SharedExperts`.
    """

    def __init__(self, router: Router, experts: nn.Module, shared_experts: nn.Module | None = None) -> None:
        super().__init__()
        experts_count = getattr(experts, "num_experts", router.num_experts)
        if experts_count != router.num_experts:
            raise ValueError(
                f"router and experts disagree on the number of experts: router.num_experts={router.num_experts}, "
                f"experts.num_experts={experts_count}"
            )
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        # Replaced from outside (e.g. by the expert-parallel strategy); the layer never checks for distribution.
        self.dispatcher = LocalDispatcher()

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Routing]:
        if x.shape[-1] != self.router.dim:
            raise ValueError(f"MoELayer expects last dimension {self.router.dim}, got input shape {tuple(x.shape)}")
        for name, tensor in (("token_ids", token_ids), ("padding_mask", padding_mask)):
            if tensor is not None and tensor.shape != x.shape[:-1]:
                raise ValueError(f"{name} must have shape {tuple(x.shape[:-1])}, got {tuple(tensor.shape)}")
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(
            x_TD,
            token_ids_T=None if token_ids is None else token_ids.reshape(-1),
            valid_mask_T=None if padding_mask is None else padding_mask.reshape(-1).bool(),
            sequence_length=x.shape[-2] if x.dim() >= 3 else None,
        )
        x_ND, tokens_per_expert_E, state = self.dispatcher.dispatch(x_TD, routing)
        y_TD = self.dispatcher.combine(self.experts(x_ND, tokens_per_expert_E), state).to(x.dtype)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(x.shape), routing
