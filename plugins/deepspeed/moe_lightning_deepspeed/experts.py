"""DeepSpeed-MoE's own layer (``deepspeed.moe.layer.MoE``: its ``TopKGate``, its dispatch and its ``Experts``) behind
:class:`~moe_lightning.MoELayer`'s interface, to compare DeepSpeed's MoE path with ours on the same weights.

Shape legend: T tokens, D model dim, F expert hidden dim, H input-projection width (2F gated, F otherwise), E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.experts.activations import Activation, activate, check_activation, input_width
from moe_lightning.layer import MoELayer
from moe_lightning.routing import Routing, TopKRouter
from moe_lightning_deepspeed.routing import routing_from_gate


class ExpertMLP(nn.Module):
    """One expert as DeepSpeed's ``Experts`` copies it: :class:`~moe_lightning.GroupedExperts`' math for one expert."""

    def __init__(self, dim: int, hidden_dim: int, activation: Activation) -> None:
        super().__init__()
        self.activation = activation
        self.w_in_DH = nn.Parameter(torch.empty(dim, input_width(activation, hidden_dim)))
        self.w_down_FD = nn.Parameter(torch.empty(hidden_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return activate(x @ self.w_in_DH.to(x.dtype), self.activation) @ self.w_down_FD.to(x.dtype)


class DeepSpeedMoELayer(nn.Module):
    """``deepspeed.moe.layer.MoE`` as an experts backend: ``forward(x) -> (y, routing)`` like :class:`MoELayer`.

    Top-k softmax gating; the k chosen weights are renormalised for k >= 2 (DeepSpeed's rule, as our
    ``TopKRouter(normalize_weights=True)``) and are the raw probability for k = 1 (``normalize_weights=False``).
    DeepSpeed's random parts are off (no second-expert sampling, no random token selection), so a layer is a
    function of its weights and input. Expert parallelism is DeepSpeed's own (``ep_size``; its process groups come
    from ``deepspeed.initialize`` or :meth:`set_deepspeed_parallelism`).

    Args:
        dim, num_experts, hidden_dim, activation: as :class:`~moe_lightning.GroupedExperts`.
        num_experts_per_token: k.
        capacity_factor: DeepSpeed's capacity per expert (its ``min_capacity`` is 0); ``None``: dropless.
        load_balance_coef: weight of DeepSpeed's GShard loss in ``routing.aux_losses["load_balance"]``.
        ep_size: DeepSpeed's expert-parallel size.
    """

    def __init__(
        self, dim: int, num_experts: int, hidden_dim: int, num_experts_per_token: int = 2,
        activation: Activation = "swiglu", capacity_factor: float | None = None, load_balance_coef: float = 0.01,
        ep_size: int = 1,
    ) -> None:
        super().__init__()
        check_activation(activation)
        if not 1 <= num_experts_per_token <= num_experts:
            raise ValueError(f"num_experts_per_token must be in [1, num_experts], got {num_experts_per_token=}, "
                             f"{num_experts=}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor=}")
        from deepspeed.moe.layer import MoE

        factor = 1.0 if capacity_factor is None else capacity_factor
        self.moe = MoE(
            dim, ExpertMLP(dim, hidden_dim, activation), num_experts, ep_size, k=num_experts_per_token,
            capacity_factor=factor, eval_capacity_factor=factor, min_capacity=0,
            drop_tokens=capacity_factor is not None, use_rts=False, top2_2nd_expert_sampling=False,
        )
        self.dim = dim
        self.num_experts = num_experts
        self.load_balance_coef = load_balance_coef

    @property
    def gate_weight_ED(self) -> nn.Parameter:
        return self.moe.deepspeed_moe.gate.wg.weight

    @property
    def experts(self) -> list[ExpertMLP]:
        """This rank's experts (``num_experts / ep_size`` of them)."""
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    def set_deepspeed_parallelism(self) -> None:
        """Create DeepSpeed's expert groups, as ``deepspeed.initialize`` does for the model it is given."""
        self.moe.set_deepspeed_parallelism()

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Routing]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"DeepSpeedMoELayer expects last dimension {self.dim}, got input shape {tuple(x.shape)}")
        if token_ids is not None or padding_mask is not None:
            raise ValueError("DeepSpeedMoELayer takes neither token_ids nor padding_mask (DeepSpeed's gate has no "
                             "token-id routing, and its token mask exists for top-1 only)")
        gate = self.moe.deepspeed_moe.gate
        outputs = []
        handle = gate.register_forward_hook(lambda module, inputs, output: outputs.append(output))
        try:
            y, _, _ = self.moe(x)
        finally:
            handle.remove()
        l_aux, _, _, expert_idx_KT, _, weight_KT, _ = outputs[0]
        logits_TE = F.linear(x.reshape(-1, self.dim).float(), self.gate_weight_ED.float())
        return y, routing_from_gate(logits_TE, expert_idx_KT, weight_KT, l_aux, self.load_balance_coef)

    @classmethod
    def from_moe_layer(cls, layer: MoELayer, **kwargs) -> DeepSpeedMoELayer:
        """A one-process DeepSpeed layer with ``layer``'s weights (a :class:`TopKRouter` with softmax scores over one
        :class:`~moe_lightning.GroupedExperts` holding every expert); ``kwargs`` go to the constructor."""
        router, experts = layer.router, layer.experts
        if kwargs.get("ep_size", 1) != 1 or experts.num_experts != router.num_experts:
            raise ValueError(f"from_moe_layer copies all {router.num_experts} experts into one process, got "
                             f"ep_size={kwargs.get('ep_size', 1)} and a layer holding {experts.num_experts}")
        if not isinstance(router, TopKRouter) or router.score_func != "softmax":
            raise TypeError(f"DeepSpeed's gate is a top-k softmax gate, got {type(router).__name__} "
                            f"(score_func={getattr(router, 'score_func', None)!r})")
        ds = cls(router.dim, router.num_experts, experts.hidden_dim, router.k, experts.activation, **kwargs)
        with torch.no_grad():
            ds.gate_weight_ED.copy_(router.gate.weight)
            for e, expert in enumerate(ds.experts):
                expert.w_in_DH.copy_(experts.w_in_EDH[e])
                expert.w_down_FD.copy_(experts.w_down_EFD[e])
        return ds
