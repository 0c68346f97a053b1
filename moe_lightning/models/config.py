"""MoETransformerConfig: the sizes of a decoder-only MoE language model, validated, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe_lightning.experts.activations import Activation, check_activation
from moe_lightning.experts.grouped import IMPLEMENTATIONS, Implementation


@dataclass
class MoETransformerConfig:
    """Sizes of a :class:`MoETransformer`. The router is configured separately (``router=`` of the model)."""

    vocab_size: int = 256
    """Embedding rows; must cover every token id the data produces."""
    dim: int = 128
    """Model (residual stream) dimension."""
    num_layers: int = 4
    """Transformer blocks."""
    num_heads: int = 4
    """Attention query heads; must divide ``dim``."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide ``num_heads``. None: same as ``num_heads``."""
    num_experts: int = 8
    """Routed experts per MoE block."""
    expert_hidden_dim: int = 256
    """Hidden width of each routed expert."""
    num_shared_experts: int = 0
    """Always-on shared experts per MoE block (0: none)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by a learned per-token sigmoid gate (Qwen2-MoE)."""
    dense_hidden_dim: int | None = None
    """Hidden width of the dense feed-forward blocks. None: ``4 * dim``."""
    moe_every: int = 1
    """After the first dense blocks, every ``moe_every``-th block is MoE (1: all of them)."""
    first_k_dense: int = 0
    """The first ``first_k_dense`` blocks use a dense feed-forward (DeepSeek-V3 keeps three)."""
    activation: Activation = "swiglu"
    """Expert and feed-forward activation: ``swiglu`` or ``gelu``."""
    experts_implementation: Implementation = "auto"
    """Routed experts: ``grouped_mm``, ``triton`` (our grouped GEMM, bf16 on CUDA), ``loop`` (the reference), or ``auto``
    (grouped_mm where torch has a kernel, else loop)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    max_seq_len: int = 2048
    """Longest sequence the rotary tables cover."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        check_activation(self.activation)
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_experts", "expert_hidden_dim",
                     "moe_every", "max_seq_len"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, got dim={self.dim} and num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads != 0:
            raise ValueError(
                f"num_kv_heads must divide num_heads, got num_kv_heads={self.num_kv_heads} and num_heads={self.num_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head dim, got dim / num_heads = {self.head_dim}")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(
                f"first_k_dense must be in [0, num_layers], got first_k_dense={self.first_k_dense} "
                f"and num_layers={self.num_layers}"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got num_shared_experts={self.num_shared_experts}")
        if self.experts_implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"experts_implementation must be one of {IMPLEMENTATIONS}, got {self.experts_implementation!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return 4 * self.dim if self.dense_hidden_dim is None else self.dense_hidden_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense and (layer_idx - self.first_k_dense) % self.moe_every == 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MoETransformerConfig:
        """A named size (see ``PRESETS``), optionally with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, MoETransformerConfig] = {
    "tiny": MoETransformerConfig(),
    # OLMoE-1B-7B's shape (Muennighoff et al. 2024): 64 fine-grained experts, top-8 (top-k lives in the router).
    "olmoe-like-1b": MoETransformerConfig(
        vocab_size=50304, dim=2048, num_layers=16, num_heads=16, num_experts=64, expert_hidden_dim=1024,
        max_seq_len=4096,
    ),
    # Mixtral-8x7B's shape: 8 large experts, top-2, GQA with 8 KV heads.
    "mixtral-like": MoETransformerConfig(
        vocab_size=32000, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, num_experts=8,
        expert_hidden_dim=14336, max_seq_len=4096, rope_theta=1e6,
    ),
}
