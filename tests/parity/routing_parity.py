"""Train-serve routing parity: the experts a serving path chooses for each token, against the training forward's.

A serving path decodes (prefill, then one token per step) while forward hooks on every :class:`MoELayer` record what
each call routed; the training forward then runs :class:`MoELightningModule` in train mode over the same tokens (the
prompt and what the path generated). Choices are compared per token and MoE layer as sets of experts; a mismatch is
explained when the training forward's K-th and (K+1)-th scores are a bf16 near-tie
(:func:`~moe_lightning.analytics.near_ties.near_tie_mask`).

Shape legend: B prompts, P prompt length, L positions, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe_lightning.analytics.near_ties import near_tie_mask
from moe_lightning.layer import MoELayer
from moe_lightning.module import MoELightningModule


class RoutingRecorder:
    """While entered: each call of each :class:`MoELayer` of ``model`` appends ``(input_TD, experts_TK)`` to
    ``calls[layer]``. Clones, so under CUDA-graph capture the recorded tensors are graph outputs that every replay
    refreshes."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [module for module in model.modules() if isinstance(module, MoELayer)]
        self.calls: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.layers]
        self._hooks = []

    def __enter__(self) -> RoutingRecorder:
        for calls, layer in zip(self.calls, self.layers):
            self._hooks.append(layer.register_forward_hook(self._hook(calls)))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()

    @staticmethod
    def _hook(calls: list):
        def record(module: MoELayer, args: tuple, output: tuple) -> None:
            x, routing = args[0], output[1]
            assert routing.rows_per_token is not None, "parity needs dropless top-k routing (K rows per token)"
            experts_TK = routing.expert_idx_N.view(-1, routing.rows_per_token)
            calls.append((x.detach().reshape(-1, x.shape[-1]).clone(), experts_TK.clone()))

        return record


@dataclass
class Reference:
    """The training forward of ``ids_BL``, per MoE layer."""

    inputs_BLD: list[Tensor]
    experts_BLK: list[Tensor]
    probs_BLE: list[Tensor]


@torch.no_grad()
def training_forward(model: nn.Module, ids_BL: Tensor) -> Reference:
    """``model`` through :class:`MoELightningModule` in train mode (the router's training decision), as fit runs it."""
    module = MoELightningModule(model=model).train()
    with RoutingRecorder(model) as recorder:
        routings = module({"input_ids": ids_BL}).routings
    batch, length = ids_BL.shape
    return Reference(
        inputs_BLD=[calls[0][0].view(batch, length, -1) for calls in recorder.calls],
        experts_BLK=[calls[0][1].view(batch, length, -1) for calls in recorder.calls],
        probs_BLE=[routing.probs_TE.view(batch, length, -1) for routing in routings],
    )


def decoded_choices(calls: list[tuple[Tensor, Tensor]], batch: int, prompt_len: int) -> Tensor:
    """``[B, L, K]`` of one layer's decode calls: the prefill's ``P`` rows per prompt, then one row per prompt per
    step. A decoder that pads the batch (to a bucket size) runs more rows; its first ``B`` are the prompts'."""
    prefill_BPK = calls[0][1].view(-1, prompt_len, calls[0][1].shape[-1])
    steps = [experts_TK.view(-1, 1, experts_TK.shape[-1]) for _, experts_TK in calls[1:]]
    return torch.cat([prefill_BPK, *steps], dim=1)[:batch]


@dataclass
class LayerParity:
    tokens: int
    near_ties: int
    """Tokens whose training-forward top-k margin is under the bf16 threshold."""
    mismatches: int
    """Tokens whose set of chosen experts differs from the training forward's."""
    unexplained: int
    """Mismatches that are not near-ties."""


def compare(reference: Reference, layer: int, experts_BLK: Tensor) -> LayerParity:
    expected_BLK = reference.experts_BLK[layer]
    assert experts_BLK.shape == expected_BLK.shape, (experts_BLK.shape, expected_BLK.shape)
    k = expected_BLK.shape[-1]
    near_BL = near_tie_mask(reference.probs_BLE[layer], k).cpu()
    mismatch_BL = (experts_BLK.sort(-1).values != expected_BLK.sort(-1).values).any(-1).cpu()
    return LayerParity(
        tokens=mismatch_BL.numel(), near_ties=int(near_BL.sum()), mismatches=int(mismatch_BL.sum()),
        unexplained=int((mismatch_BL & ~near_BL).sum()),
    )


def report(path: str, parities: list[LayerParity]) -> str:
    """One line per MoE layer: tokens, near-ties, mismatches, mismatches that are not near-ties."""
    lines = [f"{path}: MoE layer | tokens | near-ties | mismatches | not near-ties"]
    lines += [f"{path}: {i} | {p.tokens} | {p.near_ties} | {p.mismatches} | {p.unexplained}" for i, p in
              enumerate(parities)]
    return "\n".join(lines)


@torch.no_grad()
def same_input_choices(model: nn.Module, reference: Reference) -> list[Tensor]:
    """Each MoE layer of ``model`` (in eval mode) run on the training forward's input to that layer: its chosen
    experts ``[B, L, K]`` in order."""
    layers = [module for module in model.modules() if isinstance(module, MoELayer)]
    choices = []
    for layer, inputs_BLD, expected_BLK in zip(layers, reference.inputs_BLD, reference.experts_BLK, strict=True):
        routing = layer.eval()(inputs_BLD)[1]
        choices.append(routing.expert_idx_N.view(expected_BLK.shape))
    return choices
