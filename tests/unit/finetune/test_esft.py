"""ESFT: relevance by both criteria on hand-built routings, the threshold rule, stats files, and a fit that trains
exactly the chosen experts."""

import json

import pytest
import torch

from moe_lightning.finetune import ESFTFineTuning, relevance_from_stats_file, routing_relevance, select_experts
from moe_lightning.module import unpack_output
from moe_lightning.routing.base import routing_from_topk
from tests.unit.finetune.helpers import CONFIG, PatternDataModule, expert_weights, fit, tiny_module

# Five tokens, top-2 of four experts. Rows per expert: 0: 5, 1: 1, 2: 3, 3: 1 (token selection ratios .5 .1 .3 .1).
EXPERT_IDX_TK = torch.tensor([[0, 2], [0, 2], [0, 1], [2, 0], [0, 3]])
PROBS_TE = torch.tensor([
    [0.5, 0.1, 0.3, 0.1],
    [0.4, 0.2, 0.3, 0.1],
    [0.6, 0.3, 0.05, 0.05],
    [0.3, 0.1, 0.5, 0.1],
    [0.6, 0.0, 0.1, 0.3],
])  # mean gate scores: .48 .14 .25 .13


def hand_routing(expert_idx_TK=EXPERT_IDX_TK, probs_TE=PROBS_TE):
    weight_TK = probs_TE.gather(1, expert_idx_TK)
    return routing_from_topk(probs_TE.log(), probs_TE, expert_idx_TK, weight_TK)


def test_relevance_by_both_criteria_is_what_the_hand_count_says():
    routing = hand_routing()
    assert routing_relevance([routing], "token").tolist() == [[5.0, 1.0, 3.0, 1.0]]
    torch.testing.assert_close(routing_relevance([routing], "gate"), torch.tensor([[2.4, 0.7, 1.25, 0.65]]).double())


@pytest.mark.parametrize(
    "threshold, expected",
    [
        (0.5, [0]),  # expert 0 alone holds half
        (0.51, [0, 2]),
        (0.8, [0, 2]),  # reached exactly
        (0.85, [0, 1, 2]),  # experts 1 and 3 tie at .1: the lower index first
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_token_selection_keeps_the_fewest_best_experts_reaching_the_threshold(threshold, expected):
    assert select_experts(routing_relevance([hand_routing()], "token"), threshold) == {0: expected}


def test_gate_selection_ranks_by_mean_gate_score():
    relevance = routing_relevance([hand_routing()], "gate")  # shares .48 .14 .25 .13
    assert select_experts(relevance, 0.7) == {0: [0, 2]}
    assert select_experts(relevance, 0.75) == {0: [0, 1, 2]}


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_thresholds_outside_zero_one_are_named(threshold):
    with pytest.raises(ValueError, match=f"threshold={threshold}"):
        ESFTFineTuning(threshold=threshold)
    with pytest.raises(ValueError, match=f"threshold={threshold}"):
        select_experts(torch.ones(1, 4), threshold)


def write_stats(path, loads_per_record):
    path.write_text("".join(
        json.dumps({"step": step, "layers": [{"layer": layer, "load": load} for layer, load in enumerate(loads)]})
        + "\n" for step, loads in enumerate(loads_per_record)
    ))
    return path


def test_stats_file_loads_are_summed_over_records(tmp_path):
    path = write_stats(tmp_path / "router_stats.jsonl", [[[4, 0, 1, 5], [1, 1, 1, 1]], [[4, 0, 1, 5], [0, 6, 0, 2]]])
    relevance = relevance_from_stats_file(path, num_layers=2, num_experts=4)
    assert relevance.tolist() == [[8, 0, 2, 10], [1, 7, 1, 3]]
    assert select_experts(relevance, 0.5) == {0: [3], 1: [1]}


def test_stats_file_without_a_layer_or_with_other_experts_is_named(tmp_path):
    path = write_stats(tmp_path / "one_layer.jsonl", [[[1, 2, 3, 4]]])
    with pytest.raises(ValueError, match=r"no MoE layers \[1\] .* records layers \[0\]\), but the model has 2"):
        relevance_from_stats_file(path, num_layers=2, num_experts=4)
    path = write_stats(tmp_path / "six_experts.jsonl", [[[1] * 6, [1] * 6]])
    with pytest.raises(ValueError, match="counts 6 experts in MoE layer 0 .* the model has 4"):
        relevance_from_stats_file(path, num_layers=2, num_experts=4)


def test_stats_file_missing_layer_stops_the_fit_before_any_step(tmp_path):
    module = tiny_module()
    path = write_stats(tmp_path / "router_stats.jsonl", [[[1, 2, 3, 4]]])
    with pytest.raises(ValueError, match=r"no MoE layers \[1\]"):
        fit(module, [ESFTFineTuning(stats_file=str(path))], tmp_path / "run")
    assert all(p.requires_grad for p in module.parameters())


def test_bad_esft_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="no/such.jsonl"):
        ESFTFineTuning(stats_file="no/such.jsonl")
    with pytest.raises(ValueError, match="criterion='gate'"):
        ESFTFineTuning(criterion="gate", stats_file=str(write_stats(tmp_path / "s.jsonl", [[[1]]])))
    with pytest.raises(ValueError, match="criterion='load'"):
        ESFTFineTuning(criterion="load")


def calibration_choice(module, batches, threshold):
    """The selection by hand: count each layer's top-k picks of the calibration batches, rank, accumulate."""
    counts = torch.zeros(CONFIG.num_layers, CONFIG.num_experts)
    module.eval()
    with torch.no_grad():
        for batch in batches:
            for layer, routing in enumerate(unpack_output(module(batch))[1]):
                for expert in routing.expert_idx_N.tolist():
                    counts[layer, expert] += 1
    module.train()
    choice = {}
    for layer, row in enumerate(counts.tolist()):
        ranked, reached, chosen = sorted(range(len(row)), key=lambda e: (-row[e], e)), 0.0, []
        for expert in ranked:
            if reached >= threshold * sum(row):
                break
            chosen.append(expert)
            reached += row[expert]
        choice[layer] = sorted(chosen)
    return choice


def test_calibrated_esft_trains_exactly_the_experts_the_data_routes_to_most(tmp_path):
    module = tiny_module()
    batches = list(PatternDataModule().train_dataloader())[:2]
    expected = calibration_choice(module, batches, threshold=0.6)
    assert any(len(experts) < CONFIG.num_experts for experts in expected.values())
    before = expert_weights(module.model)
    callback = ESFTFineTuning(threshold=0.6, calibration_batches=2)
    fit(module, [callback], tmp_path)

    assert callback.selection == expected
    for layer, weights in enumerate(expert_weights(module.model)):
        for e in range(CONFIG.num_experts):
            assert torch.equal(weights["w_in_EDH"][e], before[layer]["w_in_EDH"][e]) == (e not in expected[layer])
    trainable = sum(len(experts) for experts in expected.values())
    per_expert = CONFIG.dim * 2 * CONFIG.expert_hidden_dim + CONFIG.expert_hidden_dim * CONFIG.dim
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == trainable * per_expert
