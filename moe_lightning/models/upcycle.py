"""Sparse upcycling: a dense :class:`MoETransformer` turned into an MoE one whose experts start as its FFNs.

Komatsuzaki et al. 2022 copy each dense FFN into every expert; fine-grained (granular) upcycling first cuts the
FFN's hidden units into ``granularity`` slices, so each expert is a copy of one slice (hidden ``F / g``).

Why the upcycled model equals the dense one at step 0. Expert ``r * g + j`` holds slice ``j`` of copy ``r``, its
down projection multiplied by ``g / routed_scaling_factor``, and for :class:`TopKRouter` the ``g`` gate rows of
each copy are tied so a copy's slices always score alike. An MoE block then computes exactly the FFN when every
token's combine weights sum to ``routed_scaling_factor``, no row is dropped, and the chosen experts form whole
copies (each copy's ``g`` slices sum to the FFN). With :class:`TopKRouter` that means:

- ``normalize_weights=True`` (or softmax scores with ``top_k == num_experts``): the weights sum to the factor;
- ``top_k`` a multiple of ``g``: top-k picks whole copies, each slice of a copy with the same weight;
- no capacity limit below ``num_experts / top_k`` (so no expert can overflow), in training and evaluation;
- with expert groups, a multiple of ``g`` experts per group (group masking keeps whole copies).

At ``g = 1`` this is plain upcycling: top-1 with weight 1, or top-k with renormalised weights over identical
copies. Other routers are not analysed and need ``exact=False``. Noise on the copies departs from equality on
purpose, by about ``noise_std`` relative to the weights.

Shape legend: D model dim, F dense FFN hidden, f expert hidden (F / g), G slices (g), E experts, C copies (E / g),
H expert input-projection width (2f gated, f otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from moe_lightning.experts import FeedForward
from moe_lightning.experts.activations import is_gated
from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.models.transformer import MoETransformer, RouterFactory
from moe_lightning.routing import Router, TopKRouter


def upcycle(
    dense: MoETransformer,
    num_experts: int,
    router: RouterFactory | None = None,
    granularity: int = 1,
    layers: Sequence[int] | None = None,
    noise_std: float = 0.0,
    seed: int = 0,
    exact: bool = True,
) -> MoETransformer:
    """A new :class:`MoETransformer` whose blocks ``layers`` are MoE blocks upcycled from ``dense``'s FFNs.

    Embeddings, attention, norms, head and the blocks left dense are copied; the routers are fresh (built by
    ``router`` and initialised like the model's own). ``dense`` is not modified. See the module docstring for what
    makes the result equal ``dense`` at step 0.

    Args:
        dense: a model whose blocks all have a dense :class:`FeedForward`.
        num_experts: experts per upcycled block; a multiple of ``granularity``.
        router: builds each router from ``(dim, num_experts)``; default :class:`TopKRouter` (top-2).
        granularity: slices per FFN (``g``); each expert has hidden width ``F / g``.
        layers: the block indices to upcycle; default all.
        noise_std: Gaussian noise added to each expert's weights, as a fraction of the copied weights' RMS.
        seed: seeds the noise.
        exact: refuse a router under which the result cannot equal ``dense`` at step 0 (noise aside).
    """
    plan = _plan(dense, num_experts, router, granularity, layers, noise_std, seed, exact)
    moe = MoETransformer(plan.config, plan.router)
    _copy_weights(dense, moe.to(device=dense.embed.weight.device, dtype=dense.embed.weight.dtype), plan)
    return moe


class UpcycledTransformer(MoETransformer):
    """A :class:`MoETransformer` upcycled at construction, for LightningCLI's ``model:`` slot (which needs a class).

    The dense model is either built fresh from ``dense_config`` (random weights) or loaded from
    ``dense_checkpoint`` (see :func:`load_dense`): a transformers checkpoint directory of a dense family, or a
    ``.safetensors`` file of :func:`moe_lightning.inference.export_safetensors`. The other arguments are those of
    :func:`upcycle`. An export of this model loads back as a plain :class:`MoETransformer`.
    """

    def __init__(
        self,
        num_experts: int,
        dense_config: MoETransformerConfig | None = None,
        dense_checkpoint: str | None = None,
        router: RouterFactory | None = None,
        granularity: int = 1,
        layers: list[int] | None = None,
        noise_std: float = 0.0,
        seed: int = 0,
        exact: bool = True,
    ) -> None:
        if (dense_config is None) == (dense_checkpoint is None):
            raise ValueError(
                "give exactly one of dense_config and dense_checkpoint, got "
                f"dense_config={dense_config!r} and dense_checkpoint={dense_checkpoint!r}"
            )
        dense = MoETransformer(dense_config) if dense_checkpoint is None else load_dense(dense_checkpoint)
        plan = _plan(dense, num_experts, router, granularity, layers, noise_std, seed, exact)
        super().__init__(plan.config, plan.router)
        _copy_weights(dense, self.to(dtype=dense.embed.weight.dtype), plan)


def load_dense(path: str | Path) -> MoETransformer:
    """The model in a transformers checkpoint directory (Llama, Qwen2, Mistral, ...; see
    :func:`~moe_lightning.models.hf.load_hf_model`) or in an :func:`~moe_lightning.inference.export_safetensors`
    file."""
    path = Path(path)
    # Both imported here: transformers is slow to import, and the exporter sits above models/ and imports it.
    if path.is_dir():
        from moe_lightning.models.hf import load_hf_model

        return load_hf_model(path)
    if path.is_file():
        from moe_lightning.inference.export import load_safetensors

        return load_safetensors(path)
    raise ValueError(
        f"dense_checkpoint={str(path)!r} is neither a transformers checkpoint directory nor a .safetensors file"
    )


def check_exact_at_step_0(router: Router, granularity: int) -> None:
    """Raise ValueError naming every setting of ``router`` under which upcycled blocks of ``granularity`` slices
    cannot equal the dense FFN at step 0 (see the module docstring)."""
    if not isinstance(router, TopKRouter):
        raise ValueError(
            f"step-0 equality is only analysed for TopKRouter, got {type(router).__name__}; pass exact=False to "
            "upcycle with it anyway"
        )
    num_experts, k = router.num_experts, router.num_experts_per_token
    problems = []
    if not router.normalize_weights and not (router.score_func == "softmax" and k == num_experts):
        problems.append(
            f"normalize_weights=False with score_func={router.score_func!r}, top_k={k} and num_experts={num_experts}"
            " leaves each token's weights summing to a varying value"
        )
    if k % granularity != 0:
        problems.append(f"top_k={k} is not a multiple of granularity={granularity}, so top-k splits copies")
    for name in ("capacity_factor", "eval_capacity_factor"):
        factor = getattr(router, name)
        if factor is not None and factor * k < num_experts:
            problems.append(f"{name}={factor} below num_experts / top_k = {num_experts}/{k} can drop tokens")
    group_size = num_experts // router.num_expert_groups
    if group_size % granularity != 0:
        problems.append(
            f"num_expert_groups={router.num_expert_groups} makes groups of {group_size} experts, not a multiple of "
            f"granularity={granularity}"
        )
    if problems:
        raise ValueError(
            "the upcycled model cannot equal the dense one at step 0: " + "; ".join(problems)
            + " (pass exact=False to upcycle anyway)"
        )


def split_feedforward(ffn: FeedForward, granularity: int) -> tuple[Tensor, Tensor]:
    """``(w_in_GDH, w_down_GfD)``: ``ffn`` cut into ``granularity`` slices of consecutive hidden units, in the
    layout of :class:`GroupedExperts`; the slices' outputs sum to ``ffn``'s because the activation is elementwise."""
    dim, hidden = ffn.down_proj.out_features, ffn.down_proj.in_features
    slice_width = hidden // granularity
    in_proj = ffn.in_proj.weight.detach()
    # in_proj rows are hidden units (gate rows, then up rows when gated); GroupedExperts keeps them as columns.
    parts = in_proj.chunk(2) if is_gated(ffn.activation) else (in_proj,)
    w_in_GDH = torch.cat([p.reshape(granularity, slice_width, dim) for p in parts], dim=1).transpose(1, 2)
    w_down_GfD = ffn.down_proj.weight.detach().reshape(dim, granularity, slice_width).permute(1, 2, 0)
    return w_in_GDH, w_down_GfD


class _Plan(NamedTuple):
    """An upcycling checked against its dense model, before any weight moves."""

    config: MoETransformerConfig
    router: RouterFactory
    layers: list[int]
    granularity: int
    down_scale: float
    """Factor on the experts' down projections: ``g / routed_scaling_factor``."""
    noise_std: float
    seed: int


def _plan(
    dense: MoETransformer, num_experts: int, router: RouterFactory | None, granularity: int,
    layers: Sequence[int] | None, noise_std: float, seed: int, exact: bool,
) -> _Plan:
    """Check every argument against ``dense`` (raising before any weight moves) and work out the upcycled config."""
    if not isinstance(dense, MoETransformer):
        raise TypeError(f"upcycle needs a MoETransformer, got {type(dense).__name__}")
    config = dense.config
    moe_blocks = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    if moe_blocks:
        raise ValueError(f"upcycle needs a dense model (moe_layers=[]), but blocks {moe_blocks} are already MoE")
    if num_experts < 1 or granularity < 1:
        raise ValueError(f"num_experts and granularity must be >= 1, got {num_experts=} and {granularity=}")
    if num_experts % granularity != 0:
        raise ValueError(f"num_experts={num_experts} is not a multiple of granularity={granularity}")
    hidden = config.ffn_hidden_dim
    if hidden % granularity != 0:
        raise ValueError(f"the dense FFN hidden width {hidden} is not divisible by granularity={granularity}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got noise_std={noise_std}")
    chosen = list(range(config.num_layers)) if layers is None else sorted(layers)
    if not chosen or len(set(chosen)) != len(chosen) or not 0 <= chosen[0] <= chosen[-1] < config.num_layers:
        raise ValueError(
            f"layers must be distinct block indices in [0, {config.num_layers}), at least one, got layers={layers}"
        )
    upcycled = dataclasses.replace(
        config, num_experts=num_experts, expert_hidden_dim=hidden // granularity, dense_hidden_dim=hidden,
        num_shared_experts=0, shared_expert_hidden_dim=None, shared_expert_gate=False, moe_layers=chosen,
        first_k_dense=0, moe_every=1,
    )
    router = router or TopKRouter
    probe = router(config.dim, num_experts)  # a router of the chosen kind, to read its settings
    if exact:
        check_exact_at_step_0(probe, granularity)
    scaling = probe.routed_scaling_factor if isinstance(probe, TopKRouter) else 1.0
    if scaling == 0:
        raise ValueError(f"routed_scaling_factor={scaling} zeroes every upcycled block's output")
    return _Plan(upcycled, router, chosen, granularity, granularity / scaling, noise_std, seed)


@torch.no_grad()
def _copy_weights(dense: MoETransformer, moe: MoETransformer, plan: _Plan) -> None:
    granularity, noise_std = plan.granularity, plan.noise_std
    upcycled_prefixes = tuple(f"blocks.{i}.ffn." for i in plan.layers)
    kept = {key: value for key, value in dense.state_dict().items() if not key.startswith(upcycled_prefixes)}
    missing, unexpected = moe.load_state_dict(kept, strict=False)
    assert not unexpected and all(key.startswith(upcycled_prefixes) for key in missing), (missing, unexpected)
    generator = torch.Generator().manual_seed(plan.seed)
    for i in plan.layers:
        layer = moe.blocks[i].ffn
        experts = layer.experts
        copies = experts.num_experts // granularity
        w_in_GDH, w_down_GfD = split_feedforward(dense.blocks[i].ffn, granularity)
        experts.w_in_EDH.copy_(_noisy(w_in_GDH.repeat(copies, 1, 1), noise_std, generator))
        experts.w_down_EFD.copy_(_noisy(w_down_GfD.repeat(copies, 1, 1) * plan.down_scale, noise_std, generator))
        if isinstance(layer.router, TopKRouter) and granularity > 1:
            gate_CGD = layer.router.gate.weight.view(copies, granularity, -1)
            gate_CGD.copy_(gate_CGD[:, :1].clone().expand_as(gate_CGD))


def _noisy(w: Tensor, noise_std: float, generator: torch.Generator) -> Tensor:
    if noise_std == 0:
        return w
    noise = torch.randn(w.shape, generator=generator).to(device=w.device, dtype=w.dtype)
    return w + noise_std * w.float().pow(2).mean().sqrt().to(w.dtype) * noise
