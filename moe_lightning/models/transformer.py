"""MoETransformer: a decoder-only language model with RMSNorm, RoPE, causal SDPA attention (GQA) and MoE blocks.

Shape legend: B batch, L sequence length, D model dim, H query heads, G key/value heads, Dh head dim, V vocab,
S key/value cache slots, F rotary frequencies (Dh / 2), Q query projection width (H * Dh), K key projection width
(G * Dh).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.experts import FeedForward, GroupedExperts, SharedExperts
from moe_lightning.kernels.rms_norm import RMSNorm
from moe_lightning.kernels.rotary import apply_rotary
from moe_lightning.layer import MoELayer
from moe_lightning.models.config import MoETransformerConfig
from moe_lightning.models.kv_cache import KVCache
from moe_lightning.models.latent_attention import LatentAttention
from moe_lightning.models.router_spec import router_factory_from_spec, router_spec
from moe_lightning.routing import Router, Routing, TopKRouter
from moe_lightning.routing.soft import SoftMoERouter
from moe_lightning.soft_layer import SoftMoELayer

RouterFactory = Callable[[int, int], Router]
"""Builds one router from ``(dim, num_experts)``; in YAML, a router ``class_path`` with its other ``init_args``."""


class MoEModelOutput(NamedTuple):
    logits: Tensor
    """``[B, L, V]`` next-token logits."""
    routings: list[Routing]
    """One :class:`Routing` per MoE block, in depth order."""


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021) in the rotate-half layout."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles_LF = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_LF", angles_LF.cos(), persistent=False)
        self.register_buffer("sin_LF", angles_LF.sin(), persistent=False)

    def forward(self, x_BHLDh: Tensor, positions: Tensor) -> Tensor:
        """``positions`` is ``[L]`` (shared by every row) or ``[B, L]`` (per row)."""
        return apply_rotary(x_BHLDh, self.cos_LF, self.sin_LF, positions)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with grouped key/value heads; ``kv_proj`` holds the key rows, then the value rows.

    Optional, per the config: q/k/v biases, and RMSNorm of queries and keys (per head or over the whole projection)
    before the rotary embedding.
    """

    def __init__(self, config: MoETransformerConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.kv_proj = nn.Linear(config.dim, 2 * self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.dim, bias=False)
        self.norm_per_head = config.qk_norm == "head"
        self.q_norm = self.k_norm = None
        if config.qk_norm != "none":
            q_width, k_width = (
                (self.head_dim, self.head_dim) if self.norm_per_head
                else (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim)
            )
            self.q_norm = RMSNorm(q_width, eps=config.norm_eps)
            self.k_norm = RMSNorm(k_width, eps=config.norm_eps)

    def forward(
        self, x_BLD: Tensor, rope: RotaryEmbedding, positions: Tensor,
        cache: KVCache | None = None, layer_idx: int = 0, attn_mask_B1LS: Tensor | None = None,
    ) -> Tensor:
        """Causal attention over ``x_BLD``; with a ``cache``, over the cached slots too (``attn_mask_B1LS`` from
        :meth:`KVCache.extend`), storing this call's keys and values as layer ``layer_idx``."""
        batch, length, _ = x_BLD.shape
        q_BLQ = self.q_proj(x_BLD)
        k_BLK, v_BLK = self.kv_proj(x_BLD).chunk(2, dim=-1)
        if self.q_norm is not None and not self.norm_per_head:
            q_BLQ, k_BLK = self.q_norm(q_BLQ), self.k_norm(k_BLK)
        q_BLHDh = q_BLQ.view(batch, length, self.num_heads, self.head_dim)
        k_BLGDh = k_BLK.view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.norm_per_head:
            q_BLHDh, k_BLGDh = self.q_norm(q_BLHDh), self.k_norm(k_BLGDh)
        q_BHLDh, k_BGLDh = q_BLHDh.transpose(1, 2), k_BLGDh.transpose(1, 2)
        v_BGLDh = v_BLK.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BHLDh, k_BGLDh = rope(q_BHLDh, positions), rope(k_BGLDh, positions)
        gqa = self.num_kv_heads != self.num_heads
        if cache is None:
            out_BHLDh = F.scaled_dot_product_attention(q_BHLDh, k_BGLDh, v_BGLDh, is_causal=True, enable_gqa=gqa)
        else:
            k_BGSDh, v_BGSDh = cache.update(layer_idx, k_BGLDh, v_BGLDh)
            k_BGSDh, v_BGSDh = k_BGSDh.to(q_BHLDh.dtype), v_BGSDh.to(q_BHLDh.dtype)
            out_BHLDh = F.scaled_dot_product_attention(
                q_BHLDh, k_BGSDh, v_BGSDh, attn_mask=attn_mask_B1LS, enable_gqa=gqa
            )
        return self.o_proj(out_BHLDh.transpose(1, 2).reshape(batch, length, -1))


def build_attention(config: MoETransformerConfig) -> nn.Module:
    """The attention module of one block, as the config chooses."""
    if config.attention == "latent":
        return LatentAttention(
            config.dim, config.num_heads, config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
            config.v_head_dim, config.q_lora_rank,
        )
    return CausalSelfAttention(config)


def build_router(config: MoETransformerConfig, layer_idx: int, router: RouterFactory) -> Router:
    """The router of MoE block ``layer_idx``: the model's ``router`` factory, unless the block's
    :class:`LayerOverride` names another router, expert count or top-k."""
    override = config.override_of(layer_idx)
    if override is None:
        return router(config.dim, config.num_experts)
    factory = router if override.router is None else router_factory_from_spec(override.router)
    top_k = {} if override.num_experts_per_token is None else {"num_experts_per_token": override.num_experts_per_token}
    try:
        return factory(config.dim, config.num_experts_in(layer_idx), **top_k)
    except (TypeError, ValueError) as error:
        raise type(error)(f"layer_overrides: block {layer_idx}'s router: {error}") from error


def build_moe_layer(router: Router, experts: nn.Module, shared: nn.Module | None) -> MoELayer:
    """The layer that runs ``router``: a :class:`SoftMoELayer` for a router that mixes tokens into slots (a decision
    no list of token rows expresses), else an :class:`MoELayer`. So a router ``class_path`` alone, model-wide or in a
    :class:`LayerOverride`, chooses soft MoE, and exports, which record the router spec, load it back."""
    layer_class = SoftMoELayer if isinstance(router, SoftMoERouter) else MoELayer
    return layer_class(router, experts, shared)


class TransformerBlock(nn.Module):
    """Pre-norm block: attention, then either an :class:`MoELayer` or a dense :class:`FeedForward`."""

    def __init__(self, config: MoETransformerConfig, layer_idx: int, router: RouterFactory) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = build_attention(config)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn: MoELayer | FeedForward
        if config.is_moe_layer(layer_idx):
            shared = None
            if config.num_shared_experts > 0:
                shared = SharedExperts(
                    config.dim, config.shared_hidden_dim, config.num_shared_experts, config.activation,
                    gated=config.shared_expert_gate,
                )
            experts = GroupedExperts(
                config.num_experts_in(layer_idx), config.dim, config.expert_hidden_dim, config.activation,
                config.experts_implementation, init_std=config.init_std,
            )
            self.ffn = build_moe_layer(build_router(config, layer_idx, router), experts, shared)
        else:
            self.ffn = FeedForward(config.dim, config.ffn_hidden_dim, config.activation)

    def forward(
        self, x_BLD: Tensor, rope: RotaryEmbedding, positions: Tensor, token_ids_BL: Tensor,
        padding_mask_BL: Tensor | None, cache: KVCache | None = None, layer_idx: int = 0,
        attn_mask_B1LS: Tensor | None = None,
    ) -> tuple[Tensor, Routing | None]:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), rope, positions, cache, layer_idx, attn_mask_B1LS)
        h_BLD = self.ffn_norm(x_BLD)
        if isinstance(self.ffn, MoELayer):
            y_BLD, routing = self.ffn(h_BLD, token_ids=token_ids_BL, padding_mask=padding_mask_BL)
            return x_BLD + y_BLD, routing
        return x_BLD + self.ffn(h_BLD), None


class MoETransformer(nn.Module):
    """Decoder-only MoE language model; ``forward(input_ids)`` returns :class:`MoEModelOutput` (logits, routings).

    Every MoE block passes ``input_ids`` to its router as token ids, so token-id routers such as
    :class:`HashRouter` work without extra wiring.

    For incremental decoding pass a :class:`KVCache` (see :func:`moe_lightning.inference.generate`). Routing stays
    per token only where the router's eval-mode decision is: top-k, hash, attention-based and (in eval mode)
    Sinkhorn routers are; expert choice and capacity-limited top-k look at the whole batch, and soft MoE
    (:class:`SoftMoERouter`, run by a :class:`SoftMoELayer`) mixes the batch's tokens at each position.

    ``config.layer_overrides`` gives single blocks another router, expert count or top-k (see :class:`LayerOverride`);
    ``router`` builds the others. ``router_spec`` holds the router factory as data (``class_path`` and ``init_args``) when it is a
    :class:`Router` class or a ``functools.partial`` of one (as LightningCLI builds it), else None; exports
    write it beside the weights.

    Args:
        config: sizes, see :class:`MoETransformerConfig`.
        router: how to build each MoE block's router from ``(dim, num_experts)``; default top-2 softmax routing.
    """

    def __init__(self, config: MoETransformerConfig | None = None, router: RouterFactory | None = None) -> None:
        super().__init__()
        self.config = config = config or MoETransformerConfig()
        router = router or TopKRouter
        self.router_spec = router_spec(router)
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.rope = RotaryEmbedding(config.rope_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(TransformerBlock(config, i, router) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, MoELayer)]

    def forward(
        self, input_ids: Tensor, padding_mask: Tensor | None = None, cache: KVCache | None = None,
        positions: Tensor | None = None,
    ) -> MoEModelOutput:
        """Logits and routings of ``input_ids`` ``[B, L]``.

        Args:
            input_ids: token ids ``[B, L]``.
            padding_mask: ``[B, L]``, True for real tokens. Without a cache it only keeps padding out of the balance
                losses; with one, padded tokens are also masked as attention keys and skipped when counting positions.
            cache: a :class:`KVCache`; the tokens are appended to it and attend to everything it already holds.
            positions: rotary positions ``[L]`` or ``[B, L]``. Default: ``0..L-1`` without a cache; with one, each
                token's count of real tokens before it in its row.
        """
        length = input_ids.shape[-1]
        if positions is not None and positions.shape not in ((length,), tuple(input_ids.shape)):
            raise ValueError(
                f"positions must have shape ({length},) or {tuple(input_ids.shape)}, got {tuple(positions.shape)}"
            )
        attn_mask_B1LS = None
        if cache is not None:
            mask_BL = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask
            cache_positions_BL, attn_mask_B1LS = cache.extend(mask_BL)
            positions = cache_positions_BL if positions is None else positions
        elif length > self.config.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len={self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(length, device=input_ids.device)
        x_BLD = self.embed(input_ids)
        routings = []
        for layer_idx, block in enumerate(self.blocks):
            x_BLD, routing = block(
                x_BLD, self.rope, positions, input_ids, padding_mask, cache, layer_idx, attn_mask_B1LS
            )
            if routing is not None:
                routings.append(routing)
        return MoEModelOutput(self.head(self.norm(x_BLD)), routings)
