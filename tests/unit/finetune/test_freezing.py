"""ExpertFineTuning: the chosen experts train, every other weight stays bit-identical through AdamW steps."""

import pytest
import torch

from moe_lightning.finetune import ExpertFineTuning, merge_expert_rows
from moe_lightning.inference.export import load_safetensors
from moe_lightning.routing import TopKRouter
from tests.unit.finetune.helpers import CONFIG, expert_weights, fit, snapshot, tiny_model, tiny_module

# One expert's weights: the SwiGLU input projection [D, 2F] and the down projection [F, D].
PER_EXPERT = CONFIG.dim * 2 * CONFIG.expert_hidden_dim + CONFIG.expert_hidden_dim * CONFIG.dim


def model_parameter_count() -> int:
    """The tiny model's parameters from its sizes: embedding and head, per block attention (q, kv, o), two norms, the
    router and the experts, then the final norm."""
    D, V, E = CONFIG.dim, CONFIG.vocab_size, CONFIG.num_experts
    block = D * D + D * 2 * D + D * D + 2 * D + D * E + E * PER_EXPERT
    return 2 * V * D + CONFIG.num_layers * block + D


def non_expert(state: dict) -> dict:
    """The entries outside the routed experts (whose names change while rows train on their own)."""
    return {name: value for name, value in state.items() if ".ffn.experts." not in name}


def test_only_the_chosen_experts_move_and_the_optimizer_holds_only_their_rows(tmp_path):
    module = tiny_module()
    total = sum(p.numel() for p in module.parameters())
    before, before_experts = snapshot(module), expert_weights(module.model)
    chosen = {0: [1, 3], 1: [2]}
    trainer = fit(module, [ExpertFineTuning(experts=chosen)], tmp_path)

    after_experts = expert_weights(module.model)
    for layer in range(CONFIG.num_layers):
        for name in ("w_in_EDH", "w_down_EFD"):
            for e in range(CONFIG.num_experts):
                same = torch.equal(after_experts[layer][name][e], before_experts[layer][name][e])
                assert same == (e not in chosen.get(layer, [])), (layer, name, e)
    after = non_expert(snapshot(module))
    assert after.keys() <= before.keys()
    assert all(torch.equal(after[name], before[name]) for name in after)

    trainable = 3 * PER_EXPERT
    held = sum(p.numel() for group in trainer.optimizers[0].param_groups for p in group["params"])
    assert held == trainable == sum(p.numel() for p in module.parameters() if p.requires_grad)
    # Training 3 of the 8 experts instead of the whole model: the count shrinks by the whole model over 3 experts.
    assert total / trainable == pytest.approx(model_parameter_count() / (3 * PER_EXPERT))


def test_all_experts_train_and_everything_else_is_frozen(tmp_path):
    module = tiny_module()
    before, before_experts = snapshot(module), expert_weights(module.model)
    fit(module, [ExpertFineTuning()], tmp_path)

    after = snapshot(module)
    assert all(torch.equal(after[name], before[name]) for name in non_expert(before))
    for layer_before, layer_after in zip(before_experts, expert_weights(module.model)):
        for name in layer_before:
            assert all(not torch.equal(layer_before[name][e], layer_after[name][e]) for e in range(CONFIG.num_experts))


def test_frozen_routers_keep_weights_and_expert_bias_while_the_rest_trains(tmp_path):
    model = tiny_model()
    for block in model.blocks:
        block.ffn.router = TopKRouter(CONFIG.dim, CONFIG.num_experts, 2, expert_bias=True)
    module = tiny_module(model)
    before = snapshot(module)
    fit(module, [ExpertFineTuning(freeze_non_experts=False)], tmp_path)

    after = snapshot(module)
    # expert_load_E counts the rows routed since the last bias step: data, not a weight.
    router_keys = [name for name in before if ".router." in name and not name.endswith("expert_load_E")]
    assert {name.rpartition(".")[2] for name in router_keys} == {"weight", "expert_bias_E"}
    assert all(torch.equal(after[name], before[name]) for name in router_keys)
    assert not torch.equal(after["model.blocks.0.attn.q_proj.weight"], before["model.blocks.0.attn.q_proj.weight"])


def test_merging_the_rows_gives_plain_parameters_with_the_trained_values(tmp_path):
    module = tiny_module()
    fit(module, [ExpertFineTuning(experts={1: [0]})], tmp_path)
    trained = expert_weights(module.model)
    merge_expert_rows(module)
    experts = module.model.moe_layers[1].experts
    assert sorted(name for name, _ in experts.named_parameters()) == ["w_down_EFD", "w_in_EDH"]
    assert torch.equal(experts.w_in_EDH, trained[1]["w_in_EDH"])


def test_export_writes_the_trained_experts_and_leaves_the_run_training_its_rows(tmp_path):
    module = tiny_module()
    fit(module, [ExpertFineTuning(experts={0: [2]}, export_path="merged.safetensors")], tmp_path)
    input_ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = load_safetensors(tmp_path / "merged.safetensors")(input_ids).logits
        live = module.model(input_ids).logits
    assert torch.equal(exported, live)
    assert [name for name, p in module.named_parameters() if p.requires_grad] == [
        "model.blocks.0.ffn.experts.parametrizations.w_in_EDH.0.rows_S",
        "model.blocks.0.ffn.experts.parametrizations.w_down_EFD.0.rows_S",
    ]


@pytest.mark.parametrize(
    "experts, message",
    [
        ({0: [1, 4, 7]}, r"expert indices \[4, 7\] of MoE layer 0 are outside \[0, 4\)"),
        ({0: [-1]}, r"expert indices \[-1\] of MoE layer 0"),
        ({1: [2, 2]}, r"expert indices \[2, 2\] of MoE layer 1 repeat"),
        ({2: [0], 5: [1]}, r"MoE layers \[2, 5\] do not exist: the model has 2"),
    ],
)
def test_bad_expert_selections_are_named_before_anything_changes(experts, message, tmp_path):
    module = tiny_module()
    before = snapshot(module)
    with pytest.raises(ValueError, match=message):
        fit(module, [ExpertFineTuning(experts=experts)], tmp_path)
    after = snapshot(module)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in module.parameters())
    assert not list(tmp_path.iterdir())


def test_contradictory_or_empty_freezing_is_refused():
    with pytest.raises(ValueError, match="freeze_non_experts=True .* freeze_routers=False"):
        ExpertFineTuning(freeze_routers=False)
    with pytest.raises(ValueError, match="freezes nothing"):
        ExpertFineTuning(freeze_routers=False, freeze_non_experts=False)
