"""Per-block overrides of the router, expert count and top-k: built as asked, refused by name, carried by exports."""

import pytest
import torch

from moe_lightning.inference import export_safetensors, load_safetensors
from moe_lightning.models import LayerOverride, MoETransformer, MoETransformerConfig
from moe_lightning.models.materialize import expert_rows
from moe_lightning.routing import ExpertChoiceRouter, TopKRouter

EXPERT_CHOICE = {"class_path": "moe_lightning.routing.ExpertChoiceRouter", "init_args": {"capacity_factor": 2.0}}
SIZES = dict(vocab_size=64, dim=32, num_layers=3, num_heads=2, num_experts=4, expert_hidden_dim=16, max_seq_len=16)


def mixed_model() -> MoETransformer:
    torch.manual_seed(0)
    config = MoETransformerConfig(**SIZES, layer_overrides=[
        LayerOverride(layer=1, num_experts=6, router=EXPERT_CHOICE),
        LayerOverride(layer=2, num_experts_per_token=3),
    ])
    return MoETransformer(config)


def test_each_block_gets_its_overridden_router_expert_count_and_top_k():
    layers = mixed_model().moe_layers
    assert [type(layer.router) for layer in layers] == [TopKRouter, ExpertChoiceRouter, TopKRouter]
    assert [layer.num_experts for layer in layers] == [4, 6, 4]
    assert [layer.experts.num_experts for layer in layers] == [4, 6, 4]
    assert (layers[0].router.num_experts_per_token, layers[2].router.num_experts_per_token) == (2, 3)
    assert layers[1].router.capacity_factor == 2.0


def test_export_with_overrides_loads_back_with_the_same_logits(tmp_path):
    model = mixed_model().eval()
    export_safetensors(model, tmp_path / "model.safetensors")
    loaded = load_safetensors(tmp_path / "model.safetensors").eval()
    assert loaded.config == model.config
    assert [type(layer.router) for layer in loaded.moe_layers] == [TopKRouter, ExpertChoiceRouter, TopKRouter]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([{"layer": 3}], r"layer=3 is outside \[0, num_layers=3\); the MoE blocks are \[0, 1, 2\]"),
        ([{"layer": -1}], r"layer=-1 is outside"),
        ([{"layer": 1}, {"layer": 1, "num_experts": 2}], r"names blocks \[1\] more than once"),
        ([{"layer": 0, "num_experts_per_token": 5}], r"block 0 .* num_experts_per_token=5 and num_experts=4"),
        ([{"layer": 2, "num_experts": 2, "num_experts_per_token": 3}], r"num_experts_per_token=3 and num_experts=2"),
        ([{"layer": 1, "num_experts": 0}], r"block 1 needs num_experts >= 1, got 0"),
        ([{"layer": 1, "router": {"class_path": "collections.OrderedDict"}}],
         r"block 1: router class_path='collections.OrderedDict' is not a moe_lightning Router"),
    ],
)
def test_bad_overrides_are_refused_with_the_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoETransformerConfig(**SIZES, layer_overrides=overrides)


def test_an_override_of_a_dense_block_is_refused():
    with pytest.raises(ValueError, match=r"layer=0 is a dense block; the MoE blocks are \[1, 2\]"):
        MoETransformerConfig(**{**SIZES, "moe_layers": [1, 2]}, layer_overrides=[{"layer": 0, "num_experts": 8}])


def test_a_router_that_does_not_fit_its_block_names_the_block():
    # The model-wide top-2 router cannot route over the single expert block 1 is given.
    config = MoETransformerConfig(**SIZES, layer_overrides=[{"layer": 1, "num_experts": 1}])
    with pytest.raises(ValueError, match=r"block 1's router: .*top_k=2 and num_experts=1"):
        MoETransformer(config)
    expert_choice_with_top_k = [{"layer": 1, "router": EXPERT_CHOICE, "num_experts_per_token": 2}]
    with pytest.raises(TypeError, match=r"block 1's router: .*num_experts_per_token"):
        MoETransformer(MoETransformerConfig(**SIZES, layer_overrides=expert_choice_with_top_k))


def test_expert_parallel_slicing_checks_each_blocks_own_expert_count():
    model = MoETransformer(MoETransformerConfig(**SIZES, layer_overrides=[{"layer": 2, "num_experts": 6}]))
    assert len(expert_rows(model, ep_rank=0, ep_size=2)) == 2 * 3  # w_in and w_down of three blocks
    with pytest.raises(ValueError, match=r"expert_parallel_size=4 .* num_experts=6 in 'blocks.2.ffn'"):
        expert_rows(model, ep_rank=0, ep_size=4)
