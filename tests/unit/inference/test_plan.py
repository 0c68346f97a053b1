"""Serving plans: the greedy allocation on hand-worked cases, bytes and errors measured on the real formats, the
versioned file checked on load, the plan made from a router_stats.jsonl, and the ``plan`` and ``quantize --plan``
commands.

Shape legend: L MoE layers, E experts.
"""

import copy
import json

import pytest

from moe_lightning.cli import main
from moe_lightning.inference.export import export_safetensors
from moe_lightning.inference.plan import PLAN_FORMAT, ServingPlan, apply_plan, parse_bytes
from moe_lightning.inference.plan_allocation import (
    FormatCost,
    allocate,
    expert_errors,
    format_costs,
    layer_bytes,
    propose_plan,
)
from moe_lightning.inference.quantization.export import load_quantized
from moe_lightning.inference.quantization.mixed import MixedPrecisionExperts
from moe_lightning.inference.quantization.quantize import expert_weight_bytes, quantize_model, weight_bytes

from .conftest import tiny_model
from .test_quantize import make_experts

bnb = pytest.importorskip("bitsandbytes")

# Three formats of 16, 8 and 4 bytes an expert, no code tables; an expert errs 0, 0.1 and 1 in them.
COSTS = {"bf16": FormatCost(0, 16), "int8": FormatCost(0, 8), "nf4": FormatCost(0, 4)}
ERRORS = {"bf16": 0.0, "int8": 0.1, "nf4": 1.0}


def allocate_one_layer(shares, budget, pinned=(), costs=COSTS, errors=ERRORS):
    return allocate([shares], [[dict(errors) for _ in shares]], [costs], [list(pinned)], budget)[0]


@pytest.mark.parametrize("budget, expected", [
    # Start: both nf4 (8 bytes). Gain per byte: hot to int8 0.75*0.9/4 = 0.169, cold to int8 0.25*0.9/4 = 0.056,
    # hot int8 to bf16 0.75*0.1/8 = 0.009, cold int8 to bf16 0.003 (direct nf4 to bf16 moves rank below each).
    (8, ["nf4", "nf4"]),
    (11, ["nf4", "nf4"]),  # the best move needs 4 more bytes
    (12, ["int8", "nf4"]),
    (20, ["int8", "int8"]),  # hot int8 -> bf16 would need 24
    (24, ["bf16", "int8"]),
    (32, ["bf16", "bf16"]),
])
def test_the_hottest_expert_gets_the_most_bits(budget, expected):
    assert allocate_one_layer([0.75, 0.25], budget) == expected


def test_an_expert_no_token_reached_stays_in_the_smallest_format():
    assert allocate_one_layer([1.0, 0.0], 100) == ["bf16", "nf4"]


def test_a_formats_code_tables_are_paid_once_per_layer():
    costs = {"a": FormatCost(0, 4), "b": FormatCost(10, 6)}
    errors = {"a": 1.0, "b": 0.0}
    # Both start in a (8 bytes); the first expert into b pays b's 10 bytes of tables, the second only its 2 more.
    assert allocate_one_layer([0.5, 0.5], 19, costs=costs, errors=errors) == ["a", "a"]
    assert allocate_one_layer([0.5, 0.5], 20, costs=costs, errors=errors) == ["b", "a"]
    assert allocate_one_layer([0.5, 0.5], 22, costs=costs, errors=errors) == ["b", "b"]
    assert layer_bytes(costs, ["b", "a", "b"]) == 10 + 6 + 4 + 6


def test_the_budget_is_shared_by_the_layers():
    # Layer 1's hot expert (0.9) is worth more than layer 0's (0.6): it gets the one int8 upgrade the budget allows.
    shares = [[0.6, 0.4], [0.9, 0.1]]
    chosen = allocate(shares, [[dict(ERRORS)] * 2] * 2, [COSTS] * 2, [[], []], 4 * 4 + 4)
    assert chosen == [["nf4", "nf4"], ["int8", "nf4"]]


def test_pinned_experts_stay_in_bf16_and_must_fit():
    assert allocate_one_layer([0.2, 0.8], 28, pinned=[1]) == ["int8", "bf16"]
    with pytest.raises(ValueError, match=r"budget=19 bytes .* below the smallest plan, 20 bytes .* the 1 pinned "
                                         r"experts take 16 bytes in bf16"):
        allocate_one_layer([0.2, 0.8], 19, pinned=[1])


def test_format_costs_are_the_stored_bytes_of_any_mix():
    experts = make_experts(num_experts=5)
    formats = ["bf16", "int8", "nf4-dq", "nf4-b256-dq"]
    costs = format_costs(experts, formats)
    for mix in (["int8", "nf4-dq", "int8", "bf16", "nf4-b256-dq"], ["nf4-dq"] * 5, ["bf16", "int8"] * 2 + ["int8"]):
        assert layer_bytes(costs, mix) == weight_bytes(MixedPrecisionExperts.from_experts(experts, mix))
    weights = 3 * experts.dim * experts.hidden_dim
    assert costs["bf16"] == FormatCost(0, 2 * weights)
    # nf4-dq: 4-bit codes, one 8-bit absmax per 64 weights and an fp32 scale per 256 of those and an fp32 offset, per
    # matrix; the 16 NF4 levels and the 256 absmax levels as fp32 tables once per matrix store (two stores).
    w_in, w_down = 2 * experts.hidden_dim * experts.dim, experts.dim * experts.hidden_dim
    per_matrix = [n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4 for n in (w_in, w_down)]
    assert costs["nf4-dq"] == FormatCost(2 * 4 * (16 + 256), sum(per_matrix))


def test_expert_errors_are_the_round_trip_errors_of_each_format():
    experts = make_experts(num_experts=3)
    errors = expert_errors(experts, ["bf16", "nf4"])
    functional = bnb.functional
    for e in range(3):
        w_in, w_down = experts.w_in_EDH[e].detach(), experts.w_down_EFD[e].detach()
        bf16 = sum((w.bfloat16().float() - w).square().sum().item() for w in (w_in, w_down))
        nf4 = sum(
            (functional.dequantize_4bit(*functional.quantize_4bit(w.T.contiguous().reshape(-1), blocksize=64,
                                                                   quant_type="nf4")) - w.T.reshape(-1))
            .square().sum().item()
            for w in (w_in, w_down)
        )
        assert errors[e]["bf16"] == pytest.approx(bf16, rel=1e-5)
        assert errors[e]["nf4"] == pytest.approx(nf4, rel=1e-5)
        assert errors[e]["bf16"] < errors[e]["nf4"]


@pytest.mark.parametrize("text, expected", [
    (4096, 4096), ("4096", 4096), ("2GiB", 2 * 2**30), ("1.5 MiB", 3 * 2**19), ("2GB", 2 * 10**9), ("3kb", 3000),
])
def test_sizes_in_human_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["2 GBs", "0", "0.1", "-1", "GiB", ""])
def test_bad_sizes_are_named(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


# ---- plans from statistics -----------------------------------------------------------------------------------

LOADS = [[50.0, 5.0, 0.0, 30.0], [1.0, 2.0, 30.0, 3.0]]  # tiny_model: 2 MoE layers of 4 experts


def write_stats(path, loads=LOADS, records=1):
    record = {"step": 10, "layers": [{"layer": i, "load": load} for i, load in enumerate(loads)]}
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(records)))
    return path


@pytest.fixture
def stats(tmp_path):
    return write_stats(tmp_path / "router_stats.jsonl")


def test_a_plan_at_the_memory_of_uniform_nf4_fits_it_and_favours_the_hot_experts(stats):
    model = tiny_model(dim=64, expert_hidden_dim=128)  # experts large enough for nf4-dq's tables to pay
    plan = propose_plan(model, stats, "nf4")
    uniform = expert_weight_bytes(quantize_model(copy.deepcopy(model), "nf4"))
    assert plan.budget_bytes == uniform and plan.total_bytes <= uniform
    assert plan.layers[0].experts[0].share == pytest.approx(50 / 85)
    bits = {"nf4-b256-dq": 0, "nf4-dq": 1, "nf4": 1, "nf4-b32-dq": 2, "int8": 3, "bf16": 4}
    for layer, load_E in zip(plan.layers, LOADS):
        ranked = [bits[layer.experts[e].format] for e in sorted(range(4), key=lambda e: -load_E[e])]
        assert ranked == sorted(ranked, reverse=True)  # hotter experts never get fewer bits
    assert plan.layers[0].experts[2].format == "nf4-b256-dq"  # no token reached it: the smallest format
    planned = apply_plan(copy.deepcopy(model), plan)
    assert expert_weight_bytes(planned) == plan.total_bytes
    assert [layer.experts.expert_formats for layer in planned.moe_layers] == plan.expert_formats


def test_pinned_experts_are_the_hottest_in_bf16(stats):
    plan = propose_plan(tiny_model(), stats, "bf16", pin=1)
    assert plan.pins == [[0], [2]]
    assert [layer.experts[e].format for layer, e in zip(plan.layers, (0, 2))] == ["bf16", "bf16"]
    assert plan.budget_bytes == expert_weight_bytes(tiny_model()) // 2  # the fp32 model's experts in bf16


def test_the_plan_file_round_trips_and_is_checked_on_load(stats, tmp_path):
    plan = propose_plan(tiny_model(), stats, "64KiB", pin=1, last_n=1)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert ServingPlan.load(path) == plan
    written = json.loads(path.read_text())
    assert written["format"] == PLAN_FORMAT and written["source"] == {"stats": str(stats), "last_n": 1}

    def refused(change, message):
        broken = copy.deepcopy(written)
        change(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            ServingPlan.load(path)

    refused(lambda p: p.update(format="moe_lightning.serving_plan/9"), "format='moe_lightning.serving_plan/9'")
    refused(lambda p: p.update(budget_bytes=1000), r"take \d+ bytes, over its budget_bytes=1000")
    refused(lambda p: p.update(extra=1), r"unknown keys \['extra'\]")
    refused(lambda p: p["layers"][1].update(layer=3), r"layers\[1\] has layer=3")
    refused(lambda p: p["layers"][0]["experts"][1].update(format="nf5"), r"experts\[1\]: unknown expert format 'nf5'")
    refused(lambda p: p["layers"][0]["experts"][0].update(format="int8"), r"experts\[0\] is pinned in format 'int8'")
    refused(lambda p: p["layers"][0]["experts"].pop(), r"layers\[0\] has num_experts=4 but 3 experts")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a serving plan"):
        ServingPlan.load(path)
    with pytest.raises(FileNotFoundError, match="no serving plan"):
        ServingPlan.load(tmp_path / "missing.json")


def test_a_plan_for_another_model_is_refused_naming_the_difference(stats):
    plan = propose_plan(tiny_model(), stats, "nf4")
    with pytest.raises(ValueError, match="the plan has 2 MoE layers, MoETransformer has 3"):
        plan.check_model(tiny_model(num_layers=4))
    with pytest.raises(ValueError, match=r"does not match the model's blocks.1.ffn: \(plan, model\) "
                                         r"\{'hidden_dim': \(32, 48\)\}"):
        apply_plan(tiny_model(expert_hidden_dim=48), plan)


def test_bad_statistics_and_budgets_are_named(stats, tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="no router statistics file at"):
        propose_plan(model, tmp_path / "missing.jsonl", "nf4")
    with pytest.raises(ValueError, match="holds no router statistics records"):
        propose_plan(model, write_stats(tmp_path / "empty.jsonl", records=0), "nf4")
    (tmp_path / "no-load.jsonl").write_text(json.dumps({"step": 1, "layers": [{"layer": 0}]}) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a router statistics record: 'load'"):
        propose_plan(model, tmp_path / "no-load.jsonl", "nf4")
    with pytest.raises(ValueError, match="statistics for 1 MoE layers, the model has 2"):
        propose_plan(model, write_stats(tmp_path / "one.jsonl", LOADS[:1]), "nf4")
    with pytest.raises(ValueError, match="has 3 experts for MoE layer 1, the model's blocks.2.ffn has 4"):
        propose_plan(model, write_stats(tmp_path / "three.jsonl", [LOADS[0], [1.0] * 3]), "nf4")
    with pytest.raises(ValueError, match=r"no routed rows for MoE layer 1 \(blocks.2.ffn\)"):
        propose_plan(model, write_stats(tmp_path / "zero.jsonl", [LOADS[0], [0.0] * 4]), "nf4")
    with pytest.raises(ValueError, match=r"budget=1024 bytes .* the 2 pinned experts take \d+ bytes in bf16"):
        propose_plan(model, stats, "1KiB", pin=1)
    with pytest.raises(ValueError, match="budget: a memory size .* got 'lots', or a format name"):
        propose_plan(model, stats, "lots")
    with pytest.raises(ValueError, match=r"add 'bf16' to formats=\['nf4'\]"):
        propose_plan(model, stats, "nf4", formats=["nf4"], pin=1)
    with pytest.raises(ValueError, match="pin must be in"):
        propose_plan(model, stats, "nf4", pin=5)
    with pytest.raises(ValueError, match="a plan is made from the float model, but blocks.1.ffn.experts is "
                                         "QuantizedExperts"):
        propose_plan(quantize_model(tiny_model(), "nf4"), stats, "nf4")


# ---- commands ------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    export_safetensors(tiny_model(vocab_size=256, max_seq_len=64), path)
    return path


def test_the_plan_command_writes_a_plan_that_quantize_applies(checkpoint, stats, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    main(["plan", str(checkpoint), "--stats", str(stats), "--budget", "bf16", "--pin", "1", "--output", str(plan_path)])
    printed = capsys.readouterr().out
    plan = ServingPlan.load(plan_path)
    assert f"wrote {plan_path}" in printed and f"experts: {plan.total_bytes} bytes" in printed
    assert "serving plan" in printed and "[0]" in printed  # the table, layer 0's pinned expert

    output = tmp_path / "planned.safetensors"
    main(["quantize", str(checkpoint), "--plan", str(plan_path), "--output", str(output), "--eval-batches", "1",
          "--eval-batch-size", "2", "--eval-seq-len", "32", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "val perplexity" in printed and f"plan={plan_path}" in printed
    loaded = load_quantized(output)
    assert [layer.experts.expert_formats for layer in loaded.moe_layers] == plan.expert_formats
    assert expert_weight_bytes(loaded) == plan.total_bytes


@pytest.mark.parametrize("args, message", [
    (["--budget", "1KiB", "--pin", "1"], "budget=1024 bytes (0.001 MiB) is below the smallest plan"),
    (["--budget", "lots"], "budget: a memory size must be"),
    (["--budget", "nf4", "--formats", "nf4,nf5"], "unknown expert format 'nf5'"),
    (["--budget", "nf4", "--pin", "many"], "invalid count_or_fraction value: 'many'"),
])
def test_the_plan_command_names_bad_input(checkpoint, stats, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        main(["plan", str(checkpoint), "--stats", str(stats), "--output", str(tmp_path / "plan.json"), *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "plan.json").exists()


def test_quantize_refuses_format_options_with_a_plan_and_a_plan_of_another_model(checkpoint, stats, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    propose_plan(tiny_model(num_layers=4), write_stats(tmp_path / "three.jsonl", LOADS + [[1.0] * 4]), "nf4").save(
        plan_path)
    output = str(tmp_path / "out.safetensors")
    for args, message in ((["--dense", "--blocksize", "64"], "['--dense', '--blocksize'] do not apply with --plan"),
                          ([], "the plan has 3 MoE layers, MoETransformer has 2"),
                          (["--mode", "nf4"], "argument --mode: not allowed with argument --plan")):
        with pytest.raises(SystemExit):
            main(["quantize", str(checkpoint), "--plan", str(plan_path), "--output", output, *args])
        assert message in capsys.readouterr().err
