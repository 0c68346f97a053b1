"""LatentAttention: multi-head latent attention (MLA) of DeepSeek-V2 and V3 (DeepSeek-AI 2024).

Keys and values come from one low-rank latent per token: ``kv_down_proj`` maps the input to that latent plus a
small rotary key shared by all heads; ``kv_up_proj`` expands the (normalised) latent into every head's
position-free key part and its value. Queries take the same split: a position-free part matched against the
latent keys, a rotary part matched against the shared rotary key. Only the rotary parts are rotated, so the
rotary key needs no per-head copy and the positions never pass through ``kv_up_proj``.

The cache stores the expanded per-head keys and values (``[B, H, S, N + R]`` and ``[B, H, S, V]``), the same
contract as :class:`CausalSelfAttention`'s, so :class:`KVCache`, :class:`StaticKVCache` and the compiled decoder
work unchanged; caching the latent instead would save memory at the cost of re-expanding every slot per step.

Shape legend: B batch, L sequence length, D model dim, H heads, N position-free (nope) query/key head dim,
R rotary query/key head dim, Q = N + R query/key head dim, V value head dim, W = N + V, C key/value latent rank,
S cache slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.kernels.rms_norm import RMSNorm
from moe_lightning.models.kv_cache import KVCache

if TYPE_CHECKING:
    from moe_lightning.models.transformer import RotaryEmbedding

LATENT_NORM_EPS = 1e-6
"""DeepSeek normalises both latents with this epsilon whatever the model's ``norm_eps`` is."""


class LatentAttention(nn.Module):
    """Causal multi-head latent attention; called like :class:`CausalSelfAttention` (rope built for ``R``).

    Args:
        dim: model dimension D.
        num_heads: H.
        kv_lora_rank: C, the width of the key/value latent.
        qk_nope_head_dim: N, the position-free part of each query and key head.
        qk_rope_head_dim: R, the rotary part of each query head and of the key shared by all heads (even).
        v_head_dim: V, each value head (may differ from ``N + R``).
        q_lora_rank: Cq, the width of a query latent (``q_down_proj``, RMSNorm, ``q_up_proj``, as in V3);
            None projects the queries directly with ``q_proj`` (as in V2-Lite).
    """

    def __init__(
        self, dim: int, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
        v_head_dim: int, q_lora_rank: int | None = None,
    ) -> None:
        super().__init__()
        sizes = dict(dim=dim, num_heads=num_heads, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
                     qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim)
        if q_lora_rank is not None:
            sizes["q_lora_rank"] = q_lora_rank
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        if qk_rope_head_dim % 2 != 0:
            raise ValueError(
                f"rotary embeddings need an even qk_rope_head_dim, got qk_rope_head_dim={qk_rope_head_dim}"
            )
        self.num_heads, self.kv_lora_rank, self.v_head_dim = num_heads, kv_lora_rank, v_head_dim
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        q_width = num_heads * self.qk_head_dim
        self.q_proj: nn.Linear | None = None
        self.q_down_proj: nn.Linear | None = None
        self.q_norm: RMSNorm | None = None
        self.q_up_proj: nn.Linear | None = None
        if q_lora_rank is None:
            self.q_proj = nn.Linear(dim, q_width, bias=False)
        else:
            self.q_down_proj = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_up_proj = nn.Linear(q_lora_rank, q_width, bias=False)
        self.kv_down_proj = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_up_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, dim, bias=False)

    def _queries(self, x_BLD: Tensor) -> Tensor:
        """Every head's query, ``[B, L, H * Q]``."""
        if self.q_proj is not None:
            return self.q_proj(x_BLD)
        return self.q_up_proj(self.q_norm(self.q_down_proj(x_BLD)))

    def forward(
        self, x_BLD: Tensor, rope: RotaryEmbedding, positions: Tensor,
        cache: KVCache | None = None, layer_idx: int = 0, attn_mask_B1LS: Tensor | None = None,
    ) -> Tensor:
        """Causal attention over ``x_BLD``; with a ``cache``, over the cached slots too (``attn_mask_B1LS`` from
        :meth:`KVCache.extend`), storing this call's expanded keys and values as layer ``layer_idx``."""
        batch, length, _ = x_BLD.shape
        heads, nope, rotary = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q_BHLQ = self._queries(x_BLD).view(batch, length, heads, self.qk_head_dim).transpose(1, 2)
        q_nope_BHLN, q_rope_BHLR = q_BHLQ.split([nope, rotary], dim=-1)

        latent_BLC, k_rope_BLR = self.kv_down_proj(x_BLD).split([self.kv_lora_rank, rotary], dim=-1)
        kv_BLHW = self.kv_up_proj(self.kv_norm(latent_BLC)).view(batch, length, heads, nope + self.v_head_dim)
        k_nope_BHLN, v_BHLV = kv_BLHW.transpose(1, 2).split([nope, self.v_head_dim], dim=-1)

        q_rope_BHLR = rope(q_rope_BHLR, positions)
        k_rope_B1LR = rope(k_rope_BLR.unsqueeze(1), positions)
        q_BHLQ = torch.cat((q_nope_BHLN, q_rope_BHLR), dim=-1)
        k_BHLQ = torch.cat((k_nope_BHLN, k_rope_B1LR.expand(-1, heads, -1, -1)), dim=-1)
        scale = self.qk_head_dim**-0.5
        if cache is None:
            out_BHLV = F.scaled_dot_product_attention(q_BHLQ, k_BHLQ, v_BHLV, is_causal=True, scale=scale)
        else:
            k_BHSQ, v_BHSV = cache.update(layer_idx, k_BHLQ, v_BHLV)
            k_BHSQ, v_BHSV = k_BHSQ.to(q_BHLQ.dtype), v_BHSV.to(q_BHLQ.dtype)
            out_BHLV = F.scaled_dot_product_attention(q_BHLQ, k_BHSQ, v_BHSV, attn_mask=attn_mask_B1LS, scale=scale)
        return self.o_proj(out_BHLV.transpose(1, 2).reshape(batch, length, -1))
