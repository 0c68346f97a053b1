"""The config fields the supported families share, translated both ways, with the settings we refuse.

HF spellings live here and in the family modules only.
"""

from __future__ import annotations

from typing import Any

from moe_lightning.models.transformer import MoETransformer
from moe_lightning.routing import TopKRouter

TOPK_ROUTER = f"{TopKRouter.__module__}.{TopKRouter.__qualname__}"


def base_config(hf: Any) -> dict[str, Any]:
    """Our :class:`MoETransformerConfig` fields that every family spells alike (attention, norms, RoPE,
    embeddings); refuses settings we do not implement, naming them."""
    refuse_unsupported(hf)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        attention_head_dim=None if head_dim * hf.num_attention_heads == hf.hidden_size else head_dim,
        max_seq_len=hf.max_position_embeddings, rope_theta=float(hf.rope_parameters["rope_theta"]),
        norm_eps=hf.rms_norm_eps, tie_embeddings=bool(hf.tie_word_embeddings), hf_model_type=hf.model_type,
    )


def refuse_unsupported(hf: Any) -> None:
    """ValueError naming the first setting of ``hf`` our transformer does not compute."""
    source = f"{hf.model_type} config"
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf.hidden_act!r} is not supported (only 'silu', i.e. SwiGLU)")
    rope_type = (hf.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"{source}: rope_parameters rope_type={rope_type!r} (rope scaling) is not supported, only "
                         "'default'")
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if (layer_types and "sliding_attention" in layer_types) or (
        layer_types is None and window and window < hf.max_position_embeddings
    ):
        raise ValueError(f"{source}: sliding_window={window} with max_position_embeddings="
                         f"{hf.max_position_embeddings} is not supported (only full causal attention)")
    if getattr(hf, "attention_dropout", 0.0):
        raise ValueError(f"{source}: attention_dropout={hf.attention_dropout} is not supported")
    for name in ("attention_bias", "mlp_bias"):  # biases on every projection, o_proj and the MLP's included
        if getattr(hf, name, False):
            raise ValueError(f"{source}: {name}=True is not supported (only q/k/v biases, as Qwen2 has)")


def topk_router_spec(hf: Any, normalize_weights: bool) -> dict[str, Any]:
    """A softmax top-k :class:`TopKRouter` spec: ``num_experts_per_tok``, the family's top-k renormalisation, and
    ``router_aux_loss_coef`` as our per-block load-balance coefficient (0 where the config has none)."""
    if hf.num_experts_per_tok > _num_experts(hf):
        raise ValueError(f"{hf.model_type} config: num_experts_per_tok={hf.num_experts_per_tok} > "
                         f"{_num_experts(hf)} experts")
    return {"class_path": TOPK_ROUTER, "init_args": {
        "num_experts_per_token": hf.num_experts_per_tok, "normalize_weights": bool(normalize_weights),
        "load_balance_coef": float(getattr(hf, "router_aux_loss_coef", 0.0) or 0.0),
    }}


def _num_experts(hf: Any) -> int:
    return getattr(hf, "num_local_experts", None) or hf.num_experts


def qwen_moe_layers(hf: Any) -> list[int]:
    """The MoE blocks of a Qwen-MoE config: every ``decoder_sparse_step``-th block, except ``mlp_only_layers``."""
    dense = set(hf.mlp_only_layers or [])
    return [i for i in range(hf.num_hidden_layers) if i not in dense and (i + 1) % hf.decoder_sparse_step == 0]


def base_hf_config(model: MoETransformer) -> dict[str, Any]:
    """The transformers config fields :func:`base_config` reads, from our model."""
    config = model.config
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings, hidden_act="silu", attention_dropout=0.0,
        dtype=str(model.embed.weight.dtype).removeprefix("torch."),
    )


def router_hf_config(model: MoETransformer) -> dict[str, Any]:
    """``num_experts_per_tok``, ``norm_topk_prob`` and ``router_aux_loss_coef`` of a model whose MoE blocks share one
    :class:`TopKRouter` config (see :func:`~moe_lightning.models.hf.family.router_problems`)."""
    router = model.moe_layers[0].router
    return dict(num_experts_per_tok=router.num_experts_per_token, norm_topk_prob=router.normalize_weights,
                router_aux_loss_coef=router.load_balance_coef, output_router_logits=False)
