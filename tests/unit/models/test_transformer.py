"""MoETransformer and its config: shapes, causality, layer placement, presets and validation."""

import functools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_lightning import MoELayer
from moe_lightning.experts import FeedForward
from moe_lightning.inference.export import CONFIG_KEY, export_safetensors, load_safetensors
from moe_lightning.models import PRESETS, KVCache, MoETransformer, MoETransformerConfig
from moe_lightning.routing import HashRouter, TopKRouter

SMALL = dict(vocab_size=64, dim=32, num_layers=3, num_heads=4, num_experts=4, expert_hidden_dim=32, max_seq_len=32)


def test_forward_shapes_and_one_routing_per_moe_block():
    model = MoETransformer(MoETransformerConfig(**SMALL, first_k_dense=1))
    out = model(torch.randint(0, 64, (2, 10)))
    assert out.logits.shape == (2, 10, 64)
    assert len(out.routings) == 2
    assert all(r.num_tokens == 20 for r in out.routings)


def test_layer_placement_follows_first_k_dense_and_moe_every():
    config = MoETransformerConfig(**{**SMALL, "num_layers": 6}, first_k_dense=1, moe_every=2)
    model = MoETransformer(config)
    kinds = ["moe" if isinstance(block.ffn, MoELayer) else "dense" for block in model.blocks]
    assert kinds == ["dense", "moe", "dense", "moe", "dense", "moe"]
    assert isinstance(model.blocks[0].ffn, FeedForward)


def test_causal_future_tokens_do_not_change_past_logits():
    model = MoETransformer(MoETransformerConfig(**SMALL, num_kv_heads=2)).eval()
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :8], model(changed).logits[:, :8])


def test_router_factory_builds_each_router_and_passes_token_ids():
    router = functools.partial(HashRouter, num_experts_per_token=2)
    model = MoETransformer(MoETransformerConfig(**SMALL), router=router)
    ids = torch.randint(0, 64, (2, 5))
    routings = model(ids).routings
    assert all(isinstance(block.ffn.router, HashRouter) for block in model.blocks)
    # Hash routing depends on the token only: the same token goes to the same experts in every position.
    r = routings[0]
    experts_of = {}
    for t, e in zip(r.token_idx_N.tolist(), r.expert_idx_N.tolist()):
        experts_of.setdefault(ids.flatten()[t].item(), set()).add(e)
    assert all(len(v) == 2 for v in experts_of.values())


def test_tied_embeddings_share_storage():
    model = MoETransformer(MoETransformerConfig(**SMALL, tie_embeddings=True))
    assert model.head.weight is model.embed.weight


def test_gradients_reach_every_parameter():
    model = MoETransformer(MoETransformerConfig(**SMALL, num_shared_experts=1, shared_expert_gate=True))
    ids = torch.randint(0, 64, (4, 16))
    out = model(ids)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
    loss = loss + sum(sum(r.aux_losses.values()) for r in out.routings)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_the_meta_device(name):
    with torch.device("meta"):
        model = MoETransformer(PRESETS[name], router=functools.partial(TopKRouter, num_experts_per_token=2))
    assert len(model.moe_layers) == PRESETS[name].num_layers


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=30, num_heads=4), "dim=30 and num_heads=4"),
        (dict(num_kv_heads=3), "num_kv_heads=3 and num_heads=4"),
        (dict(first_k_dense=5), "first_k_dense=5 and num_layers=3"),
        (dict(num_experts=0), "num_experts=0"),
        (dict(activation="relu"), "activation='relu'"),
        (dict(experts_implementation="cutlass"), "'cutlass'"),
    ],
)
def test_invalid_config_names_the_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoETransformerConfig(**{**SMALL, **overrides})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        MoETransformerConfig.from_preset("huge")


def test_too_long_sequence_is_refused():
    model = MoETransformer(MoETransformerConfig(**SMALL))
    with pytest.raises(ValueError, match="sequence length 33 exceeds max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_explicit_moe_layers_place_the_blocks():
    model = MoETransformer(MoETransformerConfig(**{**SMALL, "num_layers": 4}, moe_layers=[2, 0]))
    assert [isinstance(block.ffn, MoELayer) for block in model.blocks] == [True, False, True, False]
    dense = MoETransformer(MoETransformerConfig(**SMALL, moe_layers=[]))
    assert dense.moe_layers == [] and dense(torch.randint(0, 64, (1, 5))).routings == []


def test_head_dim_bias_and_norm_options_shape_the_attention():
    config = MoETransformerConfig(**{**SMALL, "dim": 30}, num_kv_heads=2, attention_head_dim=6, qkv_bias=True,
                                  qk_norm="head")
    attn = MoETransformer(config).blocks[0].attn
    assert attn.q_proj.weight.shape == (24, 30) and attn.kv_proj.weight.shape == (24, 30)
    assert attn.q_proj.bias.shape == (24,) and attn.o_proj.bias is None and attn.o_proj.weight.shape == (30, 24)
    assert attn.q_norm.weight.shape == (6,) and attn.k_norm.weight.shape == (6,)
    projection = MoETransformer(MoETransformerConfig(**SMALL, num_kv_heads=2, qk_norm="projection")).blocks[0].attn
    assert projection.q_norm.weight.shape == (32,) and projection.k_norm.weight.shape == (16,)


def test_shared_expert_width_need_not_be_the_routed_width():
    config = MoETransformerConfig(**SMALL, num_shared_experts=1, shared_expert_gate=True, shared_expert_hidden_dim=20)
    shared = MoETransformer(config).blocks[0].ffn.shared_experts
    assert shared.mlp.down_proj.weight.shape == (32, 20) and shared.gate is not None


@pytest.mark.parametrize("qk_norm", ["head", "projection"])
@torch.no_grad()
def test_attention_options_decode_with_the_cache_like_the_full_forward(qk_norm):
    """Prefill then one token at a time through the KV cache gives the logits of one full forward pass."""
    torch.manual_seed(0)
    config = MoETransformerConfig(**SMALL, num_kv_heads=2, attention_head_dim=10, qkv_bias=True, qk_norm=qk_norm)
    model = MoETransformer(config).eval()
    for module in model.modules():  # non-trivial biases and norm weights, so a misplaced one would show
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
        if isinstance(module, torch.nn.RMSNorm):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    ids = torch.randint(0, 64, (2, 9))
    full = model(ids).logits
    cache = KVCache.for_model(model, batch_size=2, max_len=9)
    steps = [model(ids[:, :5], cache=cache).logits] + [model(ids[:, i:i + 1], cache=cache).logits for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_config_written_before_the_attention_and_layer_options_still_loads(tmp_path):
    """Files exported before attention_head_dim, qkv_bias, qk_norm, moe_layers and shared_expert_hidden_dim existed
    carry a config without them; they load with the behaviour of that time."""
    model = MoETransformer(MoETransformerConfig(**SMALL, first_k_dense=1)).eval()
    path = tmp_path / "old.safetensors"
    export_safetensors(model, path)
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    old_config = json.loads(metadata[CONFIG_KEY])
    for name in ("attention_head_dim", "qkv_bias", "qk_norm", "moe_layers", "shared_expert_hidden_dim"):
        del old_config[name]
    save_file(tensors, str(path), metadata={**metadata, CONFIG_KEY: json.dumps(old_config)})
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_safetensors(path).eval()(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(attention_head_dim=0), "attention_head_dim=0"),
        (dict(attention_head_dim=5), "head_dim=5"),
        (dict(qk_norm="layer"), "qk_norm='layer'"),
        (dict(shared_expert_hidden_dim=0), "shared_expert_hidden_dim=0"),
        (dict(moe_layers=[0, 3]), r"num_layers=3\), got moe_layers=\[0, 3\]"),
        (dict(moe_layers=[1, 1]), r"moe_layers=\[1, 1\]"),
        (dict(moe_layers=[1], first_k_dense=1), "first_k_dense=1 and moe_every=1"),
    ],
)
def test_invalid_new_options_name_the_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoETransformerConfig(**{**SMALL, **overrides})


def test_attention_head_dim_frees_dim_from_dividing_by_num_heads():
    assert MoETransformerConfig(**{**SMALL, "dim": 30}, attention_head_dim=8).head_dim == 8
    assert MoETransformerConfig.from_preset("tiny", dim=64).head_dim == 16  # replace() re-derives the head dim
