"""MoETransformerConfig: the sizes of a decoder-only MoE language model, validated, with named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from moe_lightning.experts.activations import Activation, check_activation
from moe_lightning.experts.grouped import IMPLEMENTATIONS, Implementation
from moe_lightning.models.router_spec import router_factory_from_spec

QKNorm = Literal["none", "head", "projection"]
QK_NORMS: tuple[str, ...] = get_args(QKNorm)
AttentionKind = Literal["softmax", "latent"]
ATTENTION_KINDS: tuple[str, ...] = get_args(AttentionKind)
LATENT_SIZES = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
"""The sizes latent attention needs (``q_lora_rank`` may stay None)."""


@dataclass
class LayerOverride:
    """How one MoE block departs from the model-wide router and expert count (``layer_overrides`` of the config)."""

    layer: int
    """Index of the block; it must be an MoE block."""
    num_experts: int | None = None
    """Routed experts of this block. None: the model's ``num_experts``."""
    num_experts_per_token: int | None = None
    """Top-k of this block's router, passed to it as ``num_experts_per_token``. None: the router's own."""
    router: dict[str, Any] | None = None
    """This block's router as ``class_path`` (a :class:`Router` subclass) and ``init_args``, as under the model's
    ``router:``. None: the model's router."""


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
    """Attention query heads; must divide ``dim`` unless ``attention_head_dim`` is set."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide ``num_heads``. None: same as ``num_heads``."""
    attention_head_dim: int | None = None
    """Width of each query/key/value head (Qwen3-MoE uses 128 at any ``dim``). None: ``dim / num_heads``. Read the
    resolved width as ``head_dim``."""
    qkv_bias: bool = False
    """Give the query, key and value projections a bias (Qwen2, Qwen2-MoE); the output projection never has one."""
    qk_norm: QKNorm = "none"
    """RMSNorm on queries and keys before the rotary embedding: ``head`` over each head (Qwen3-MoE), ``projection``
    over all heads of the projection together (OLMoE), ``none``."""
    attention: AttentionKind = "softmax"
    """``softmax``: multi-head attention with grouped key/value heads; ``latent``: multi-head latent attention
    (DeepSeek-V2/V3), sized by the five fields below, with ``num_heads`` heads and no ``num_kv_heads``,
    ``attention_head_dim``, ``qkv_bias`` or ``qk_norm``."""
    q_lora_rank: int | None = None
    """Latent attention: width of the query latent (DeepSeek-V3: 1536). None: queries projected directly."""
    kv_lora_rank: int | None = None
    """Latent attention: width of the key/value latent each token's keys and values are expanded from (512)."""
    qk_nope_head_dim: int | None = None
    """Latent attention: the position-free part of each query/key head (128)."""
    qk_rope_head_dim: int | None = None
    """Latent attention: the rotary part of each query head and of the key all heads share (64; even)."""
    v_head_dim: int | None = None
    """Latent attention: each value head (128)."""
    num_experts: int = 8
    """Routed experts per MoE block."""
    expert_hidden_dim: int = 256
    """Hidden width of each routed expert."""
    num_shared_experts: int = 0
    """Always-on shared experts per MoE block (0: none)."""
    shared_expert_hidden_dim: int | None = None
    """Hidden width of each shared expert (Qwen2-MoE's need not be a multiple of ``expert_hidden_dim``). None: the
    routed experts' ``expert_hidden_dim``."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by a learned per-token sigmoid gate (Qwen2-MoE)."""
    dense_hidden_dim: int | None = None
    """Hidden width of the dense feed-forward blocks. None: ``4 * dim``."""
    moe_every: int = 1
    """After the first dense blocks, every ``moe_every``-th block is MoE (1: all of them)."""
    first_k_dense: int = 0
    """The first ``first_k_dense`` blocks use a dense feed-forward (DeepSeek-V3 keeps three)."""
    moe_layers: list[int] | None = None
    """The indices of the MoE blocks, the others dense (``[]``: a dense model). None: placed by ``first_k_dense`` and
    ``moe_every``, which must then keep their defaults."""
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
    hf_model_type: str | None = None
    """The transformers family (``model_type``) the weights were imported from; :func:`export_hf` writes back to it
    by default. It changes nothing in the computation."""
    layer_overrides: list[LayerOverride] = field(default_factory=list)
    """Per-block departures from the model-wide router, ``num_experts`` and top-k, one :class:`LayerOverride` per
    MoE block, e.g. ``[{layer: 3, num_experts: 16, router: {class_path: ..., init_args: {...}}}]``."""

    def __post_init__(self) -> None:
        check_activation(self.activation)
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "num_experts", "expert_hidden_dim",
                     "moe_every", "max_seq_len"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        for name in ("attention_head_dim", "shared_expert_hidden_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {name}={value}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got attention={self.attention!r}")
        if self.attention == "latent":
            self._check_latent_attention()
        else:
            self._check_softmax_attention()
        self._check_moe_layers()
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
        self._check_layer_overrides()

    def _check_softmax_attention(self) -> None:
        sizes = {name: getattr(self, name) for name in ("q_lora_rank", *LATENT_SIZES)}
        given = {name: value for name, value in sizes.items() if value is not None}
        if given:
            raise ValueError(f"{given} size latent attention: set attention='latent' or leave them None")
        if self.attention_head_dim is None and self.dim % self.num_heads != 0:
            raise ValueError(
                f"dim must be divisible by num_heads (or set attention_head_dim), got dim={self.dim} and "
                f"num_heads={self.num_heads}"
            )
        if self.num_heads % self.kv_heads != 0:
            raise ValueError(
                f"num_kv_heads must divide num_heads, got num_kv_heads={self.num_kv_heads} and num_heads={self.num_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head dim, got head_dim={self.head_dim}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got qk_norm={self.qk_norm!r}")

    def _check_latent_attention(self) -> None:
        missing = [name for name in LATENT_SIZES if getattr(self, name) is None]
        if missing:
            raise ValueError(f"attention='latent' needs {missing} (got None)")
        for name in ("q_lora_rank", *LATENT_SIZES):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        if self.qk_rope_head_dim % 2 != 0:
            raise ValueError(
                f"rotary embeddings need an even qk_rope_head_dim, got qk_rope_head_dim={self.qk_rope_head_dim}"
            )
        softmax_only = dict(num_kv_heads=(self.num_kv_heads, None), attention_head_dim=(self.attention_head_dim, None),
                            qkv_bias=(self.qkv_bias, False), qk_norm=(self.qk_norm, "none"))
        set_here = {name: value for name, (value, default) in softmax_only.items() if value != default}
        if set_here:
            raise ValueError(f"latent attention has no {set_here}: leave them at their defaults")

    def _check_moe_layers(self) -> None:
        if self.moe_layers is None:
            return
        if self.first_k_dense != 0 or self.moe_every != 1:
            raise ValueError(
                f"moe_layers={self.moe_layers} places the MoE blocks itself: leave first_k_dense={self.first_k_dense} "
                f"and moe_every={self.moe_every} at 0 and 1"
            )
        outside = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if outside or len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError(
                f"moe_layers must be distinct indices in [0, num_layers={self.num_layers}), got "
                f"moe_layers={self.moe_layers}"
            )

    def _check_layer_overrides(self) -> None:
        # Exports write the config as JSON, which gives each override back as a mapping.
        self.layer_overrides = [
            LayerOverride(**entry) if isinstance(entry, Mapping) else entry for entry in self.layer_overrides
        ]
        layers = [override.layer for override in self.layer_overrides]
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        if repeated:
            raise ValueError(f"layer_overrides names blocks {repeated} more than once, got layers {layers}")
        moe_blocks = [i for i in range(self.num_layers) if self.is_moe_layer(i)]
        for override in self.layer_overrides:
            if override.layer not in moe_blocks:
                where = "a dense block" if 0 <= override.layer < self.num_layers else (
                    f"outside [0, num_layers={self.num_layers})")
                raise ValueError(
                    f"layer_overrides: layer={override.layer} is {where}; the MoE blocks are {moe_blocks}"
                )
            if override.num_experts is not None and override.num_experts < 1:
                raise ValueError(
                    f"layer_overrides: block {override.layer} needs num_experts >= 1, got {override.num_experts}"
                )
            num_experts = self.num_experts_in(override.layer)
            top_k = override.num_experts_per_token
            if top_k is not None and not 1 <= top_k <= num_experts:
                raise ValueError(
                    f"layer_overrides: block {override.layer} needs num_experts_per_token in [1, num_experts], got "
                    f"num_experts_per_token={top_k} and num_experts={num_experts}"
                )
            try:
                override.router is None or router_factory_from_spec(override.router)  # an importable Router class
            except ValueError as error:
                raise ValueError(f"layer_overrides: block {override.layer}: {error}") from error

    def override_of(self, layer_idx: int) -> LayerOverride | None:
        """The :class:`LayerOverride` of block ``layer_idx``, None if it has none."""
        return next((override for override in self.layer_overrides if override.layer == layer_idx), None)

    def num_experts_in(self, layer_idx: int) -> int:
        """Routed experts of MoE block ``layer_idx``: its override's ``num_experts``, else ``num_experts``."""
        override = self.override_of(layer_idx)
        return self.num_experts if override is None or override.num_experts is None else override.num_experts

    @property
    def head_dim(self) -> int:
        """Width of each attention head: ``attention_head_dim`` or ``dim / num_heads``."""
        return self.dim // self.num_heads if self.attention_head_dim is None else self.attention_head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def rope_dim(self) -> int:
        """Width the rotary embedding turns: ``qk_rope_head_dim`` for latent attention, else ``head_dim``."""
        return self.qk_rope_head_dim if self.attention == "latent" else self.head_dim

    @property
    def kv_cache_dims(self) -> tuple[int, int, int]:
        """``(heads, key width, value width)`` each attention layer caches per token. Latent attention caches every
        head's expanded key (``qk_nope_head_dim + qk_rope_head_dim``) and value (``v_head_dim``)."""
        if self.attention == "latent":
            return self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim
        return self.kv_heads, self.head_dim, self.head_dim

    @property
    def ffn_hidden_dim(self) -> int:
        return 4 * self.dim if self.dense_hidden_dim is None else self.dense_hidden_dim

    @property
    def shared_hidden_dim(self) -> int:
        """Hidden width of each shared expert: ``shared_expert_hidden_dim`` or ``expert_hidden_dim``."""
        return self.expert_hidden_dim if self.shared_expert_hidden_dim is None else self.shared_expert_hidden_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.moe_layers is not None:
            return layer_idx in self.moe_layers
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
