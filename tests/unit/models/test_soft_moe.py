"""Soft MoE in MoETransformer: chosen by the router spec alone, causal, trains, exports, analysed, refused by generate."""

from __future__ import annotations

import functools

import pytest
import torch

from moe_lightning.analytics import RoutingCounts, layer_statistics, top1_expert
from moe_lightning.inference import InferenceEngine, export_safetensors, generate, load_safetensors
from moe_lightning.layer import MoELayer
from moe_lightning.models import LayerOverride, MoETransformer, MoETransformerConfig
from moe_lightning.models.materialize import build_on_meta, materialize
from moe_lightning.routing.soft import SoftMoERouter
from moe_lightning.soft_layer import SoftMoELayer

SOFT = {"class_path": "moe_lightning.routing.soft.SoftMoERouter", "init_args": {"slots_per_expert": 2}}
SIZES = dict(vocab_size=32, dim=32, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=32, max_seq_len=32)


def soft_model(**sizes) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(MoETransformerConfig(**{**SIZES, **sizes}), functools.partial(SoftMoERouter, slots_per_expert=2))


def test_the_router_spec_alone_chooses_the_soft_layer_model_wide_and_per_block():
    assert [type(layer) for layer in soft_model().moe_layers] == [SoftMoELayer, SoftMoELayer]
    mixed = MoETransformer(MoETransformerConfig(**SIZES, layer_overrides=[LayerOverride(layer=1, router=SOFT)]))
    assert [type(layer) for layer in mixed.moe_layers] == [MoELayer, SoftMoELayer]
    assert mixed.moe_layers[1].router.slots_per_expert == 2


def test_no_logit_depends_on_a_later_token():
    model = soft_model()
    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(changed).logits[:, :6], model(ids).logits[:, :6])


def test_a_small_model_learns():
    model = soft_model()
    ids = torch.randint(0, 32, (8, 17), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(layer.router.phi_ESD.grad.abs().sum() > 0 for layer in model.moe_layers)


def test_analytics_read_the_per_token_rows():
    model = soft_model()
    routings = model(torch.randint(0, 32, (4, 8))).routings
    counts = RoutingCounts.zeros(2, 4)
    counts.add_routings([routing.detach() for routing in routings], labels_T=None)
    stats = layer_statistics(counts, dead_threshold=0.05)
    assert counts.load_LE.tolist() == [[32.0] * 4] * 2  # every token's output mixes every expert's slots
    assert [s.scalars()["dropped_fraction"] for s in stats] == [0.0, 0.0]
    assert counts.near_ties_L.tolist() == [0.0, 0.0]  # no expert is left out, so no choice can flip
    share_TE = routings[0].probs_TE
    torch.testing.assert_close(share_TE.sum(-1), torch.ones(32))
    assert top1_expert(routings[0]).tolist() == share_TE.argmax(-1).tolist()


def test_an_export_loads_back_as_soft_moe(tmp_path):
    model = soft_model().eval()
    export_safetensors(model, tmp_path / "soft.safetensors")
    loaded = load_safetensors(tmp_path / "soft.safetensors").eval()
    assert [type(layer) for layer in loaded.moe_layers] == [SoftMoELayer, SoftMoELayer]
    ids = torch.randint(0, 32, (3, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_meta_device_build_materialises_to_the_ordinary_build():
    meta, record = build_on_meta(soft_model)
    materialize(meta, record)
    ordinary = soft_model().state_dict()
    assert all(torch.equal(tensor, ordinary[name]) for name, tensor in meta.state_dict().items())


def test_generation_refuses_it_by_name():
    model = soft_model()
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.router \(soft MoE"):
        generate(model, [[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(ValueError, match="soft MoE"):
        InferenceEngine(model)
