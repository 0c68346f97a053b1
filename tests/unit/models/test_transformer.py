"""MoETransformer and its config: shapes, causality, layer placement, presets and validation."""

import functools

import pytest
import torch

from moe_lightning import MoELayer
from moe_lightning.experts import FeedForward
from moe_lightning.models import PRESETS, MoETransformer, MoETransformerConfig
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
