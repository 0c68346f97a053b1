"""How each of our parameters is made of a transformers checkpoint's tensors, and back.

A :class:`TensorMap` names, for every tensor of our ``state_dict``, one or more candidate sources: the first whose
tensors all exist in a checkpoint is read. Three kinds of source cover every family:

- :class:`Rows`: our tensor is HF tensors stacked along dim 0 (``kv_proj`` = k rows then v rows; a SwiGLU
  ``in_proj`` = gate rows then up rows); one name is a plain copy;
- :class:`PerExpert`: our ``[E, A, B]`` expert tensor from one set of HF matrices per expert, expert ``e``'s slice
  being those matrices stacked along dim 0 and transposed (the per-expert layout of hub checkpoints);
- :class:`FusedExperts`: from one HF ``[E, B, A]`` tensor, transposed (transformers v5's in-memory layout).

Every source splits into equal parts, so the shape each HF tensor must have follows from ours.

Shape legend: E experts, A and B our expert tensor's last two dims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moe_lightning.models.config import MoETransformerConfig

Reader = Callable[[str, "range | None"], Tensor]
"""Reads one HF tensor, or only the rows ``range`` of its first dim."""


@dataclass(frozen=True)
class Rows:
    """Our tensor = ``names`` stacked along dim 0, in that order, each an equal share of our rows."""

    names: tuple[str, ...]

    def hf_names(self, experts: range | None = None) -> list[str]:
        return list(self.names)

    def hf_shapes(self, shape: tuple[int, ...], num_experts: int | None = None) -> dict[str, tuple[int, ...]]:
        part = (shape[0] // len(self.names), *shape[1:])
        return {name: part for name in self.names}

    def read(self, read: Reader, experts: range | None = None) -> Tensor:
        parts = [read(name, None) for name in self.names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def split(self, tensor: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, tensor.chunk(len(self.names), dim=0)))


@dataclass(frozen=True)
class PerExpert:
    """Our ``[E, A, B]`` tensor; expert ``e`` = the ``templates`` (with ``{e}``) stacked along dim 0, transposed."""

    templates: tuple[str, ...]

    def hf_names(self, experts: range) -> list[str]:
        return [template.format(e=e) for e in experts for template in self.templates]

    def hf_shapes(self, shape: tuple[int, ...], num_experts: int) -> dict[str, tuple[int, ...]]:
        _, a, b = shape
        part = (b // len(self.templates), a)
        return {name: part for name in self.hf_names(range(num_experts))}

    def read(self, read: Reader, experts: range) -> Tensor:
        per_expert = [torch.cat([read(t.format(e=e), None) for t in self.templates], dim=0) for e in experts]
        return torch.stack(per_expert).transpose(1, 2)

    def split(self, tensor: Tensor) -> dict[str, Tensor]:
        out = {}
        for e, matrix_BA in enumerate(tensor.transpose(1, 2)):
            out.update(zip([t.format(e=e) for t in self.templates], matrix_BA.chunk(len(self.templates), dim=0)))
        return out


@dataclass(frozen=True)
class FusedExperts:
    """Our ``[E, A, B]`` tensor = HF tensor ``name`` ``[E, B, A]`` transposed."""

    name: str

    def hf_names(self, experts: range | None = None) -> list[str]:
        return [self.name]

    def hf_shapes(self, shape: tuple[int, ...], num_experts: int) -> dict[str, tuple[int, ...]]:
        return {self.name: (shape[0], shape[2], shape[1])}

    def read(self, read: Reader, experts: range) -> Tensor:
        return read(self.name, experts).transpose(1, 2)

    def split(self, tensor: Tensor) -> dict[str, Tensor]:
        return {self.name: tensor.transpose(1, 2)}


Source = Rows | PerExpert | FusedExperts
TensorMap = dict[str, tuple[Source, ...]]
"""Our parameter name -> its candidate sources: first the layout checkpoints are written in (what export writes),
last transformers v5's module layout (what an in-memory transformers model holds)."""


def is_expert_source(sources: tuple[Source, ...]) -> bool:
    return isinstance(sources[0], (PerExpert, FusedExperts))


def llama_layer_map(
    i: int, *, moe: bool, qkv_bias: bool, qk_norm: bool, moe_prefix: str = "mlp",
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    shared_expert: str | None = None, shared_expert_gate: str | None = None,
) -> TensorMap:
    """The tensors of decoder layer ``i`` in the Llama-style layout that all supported families share.

    Args:
        moe: the layer is MoE (router ``{moe_prefix}.gate`` and experts) rather than a dense ``mlp``.
        qkv_bias: the query, key and value projections have biases.
        qk_norm: the attention has ``q_norm`` and ``k_norm`` weights.
        moe_prefix: where the MoE block lives in the per-expert layout (Mixtral: ``block_sparse_moe``).
        expert_projections: the per-expert gate, up and down names (Mixtral: ``w1``, ``w3``, ``w2``).
        shared_expert: the shared expert MLP's name in the MoE block (Qwen2-MoE: ``shared_expert``), if any.
        shared_expert_gate: the shared expert's sigmoid gate name in the MoE block, if any.
    """
    hf, ours = f"model.layers.{i}", f"blocks.{i}"
    attn = f"{hf}.self_attn"
    out: TensorMap = {
        f"{ours}.attn_norm.weight": (Rows((f"{hf}.input_layernorm.weight",)),),
        f"{ours}.ffn_norm.weight": (Rows((f"{hf}.post_attention_layernorm.weight",)),),
        f"{ours}.attn.q_proj.weight": (Rows((f"{attn}.q_proj.weight",)),),
        f"{ours}.attn.kv_proj.weight": (Rows((f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")),),
        f"{ours}.attn.o_proj.weight": (Rows((f"{attn}.o_proj.weight",)),),
    }
    if qkv_bias:
        out[f"{ours}.attn.q_proj.bias"] = (Rows((f"{attn}.q_proj.bias",)),)
        out[f"{ours}.attn.kv_proj.bias"] = (Rows((f"{attn}.k_proj.bias", f"{attn}.v_proj.bias")),)
    if qk_norm:
        out[f"{ours}.attn.q_norm.weight"] = (Rows((f"{attn}.q_norm.weight",)),)
        out[f"{ours}.attn.k_norm.weight"] = (Rows((f"{attn}.k_norm.weight",)),)
    if not moe:
        out.update(swiglu_map(f"{ours}.ffn", f"{hf}.mlp"))
        return out
    gate, up, down = expert_projections
    experts, fused = f"{hf}.{moe_prefix}.experts", f"{hf}.mlp.experts"
    gates = (Rows((f"{hf}.{moe_prefix}.gate.weight",)), Rows((f"{hf}.mlp.gate.weight",)))
    out[f"{ours}.ffn.router.gate.weight"] = tuple(dict.fromkeys(gates))  # one candidate where the prefixes agree
    out[f"{ours}.ffn.experts.w_in_EDH"] = (
        PerExpert((f"{experts}.{{e}}.{gate}.weight", f"{experts}.{{e}}.{up}.weight")),
        FusedExperts(f"{fused}.gate_up_proj"),
    )
    out[f"{ours}.ffn.experts.w_down_EFD"] = (PerExpert((f"{experts}.{{e}}.{down}.weight",)), FusedExperts(f"{fused}.down_proj"))
    if shared_expert is not None:
        out.update(swiglu_map(f"{ours}.ffn.shared_experts.mlp", f"{hf}.mlp.{shared_expert}"))
    if shared_expert_gate is not None:
        out[f"{ours}.ffn.shared_experts.gate.weight"] = (Rows((f"{hf}.mlp.{shared_expert_gate}.weight",)),)
    return out


def swiglu_map(ours: str, hf: str) -> TensorMap:
    """Our :class:`FeedForward` ``ours`` from an HF ``gate_proj``/``up_proj``/``down_proj`` MLP ``hf``."""
    return {
        f"{ours}.in_proj.weight": (Rows((f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight")),),
        f"{ours}.down_proj.weight": (Rows((f"{hf}.down_proj.weight",)),),
    }


def embedding_map(tie_embeddings: bool) -> TensorMap:
    """The token embedding, final norm and (untied) output head."""
    out: TensorMap = {
        "embed.weight": (Rows(("model.embed_tokens.weight",)),),
        "norm.weight": (Rows(("model.norm.weight",)),),
    }
    if not tie_embeddings:
        out["head.weight"] = (Rows(("lm_head.weight",)),)
    return out


def llama_tensor_map(config: MoETransformerConfig, **naming: Any) -> TensorMap:
    """Every tensor of a model in the Llama-style layout; ``naming`` are :func:`llama_layer_map`'s family names."""
    out = embedding_map(config.tie_embeddings)
    for i in range(config.num_layers):
        out.update(llama_layer_map(
            i, moe=config.is_moe_layer(i), qkv_bias=config.qkv_bias, qk_norm=config.qk_norm != "none", **naming
        ))
    return out
