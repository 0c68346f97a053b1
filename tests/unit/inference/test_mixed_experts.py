"""MixedPrecisionExperts: each expert computes exactly what it would in a layer of its format alone, costs the bytes
that layer pays per expert, and a model of them saves and loads back bit for bit.

Shape legend: N routed rows, D model dim, F expert hidden dim, E experts.
"""

import json

import pytest
import torch
from safetensors import safe_open

from moe_lightning.inference.quantization.experts import QuantizedExperts
from moe_lightning.inference.quantization.export import QUANTIZATION_KEY, load_quantized, save_quantized
from moe_lightning.inference.quantization.formats import format_config
from moe_lightning.inference.quantization.mixed import MixedPrecisionExperts
from moe_lightning.inference.quantization.quantize import quantize_experts_by_format, quantize_model, weight_bytes

from .conftest import tiny_model
from .test_quantize import make_experts, routed_rows

pytest.importorskip("bitsandbytes")

FORMATS = ["int8", "bf16", "nf4-b32-dq", "nf4"]


def test_each_expert_computes_what_a_layer_of_its_format_computes():
    experts = make_experts()
    x_ND, tokens_per_expert_E = routed_rows()  # expert 1 gets no rows
    mixed = MixedPrecisionExperts.from_experts(experts, FORMATS).eval()
    bf16_reference = make_experts()
    bf16_reference.w_in_EDH.data = experts.w_in_EDH.detach().bfloat16().float()
    bf16_reference.w_down_EFD.data = experts.w_down_EFD.detach().bfloat16().float()
    rows_E = x_ND.split(tokens_per_expert_E.tolist())
    with torch.no_grad():
        got_E = mixed(x_ND, tokens_per_expert_E).split(tokens_per_expert_E.tolist())
        for e, name in enumerate(FORMATS):
            counts_E = torch.zeros(4, dtype=torch.long)
            counts_E[e] = len(rows_E[e])
            config = format_config(name)
            alone = bf16_reference if config is None else QuantizedExperts.from_experts(experts, config)
            assert torch.equal(got_E[e], alone(rows_E[e], counts_E)), name


def test_an_expert_costs_what_a_layer_of_its_format_pays_per_expert():
    experts = make_experts(num_experts=4)
    mixed = MixedPrecisionExperts.from_experts(experts, FORMATS)
    D, F = experts.dim, experts.hidden_dim
    weights = 2 * F * D + F * D  # SwiGLU: gate and up, then down
    expected = 2 * weights  # bf16
    for name in ("int8", "nf4-b32-dq", "nf4"):
        alone = weight_bytes(QuantizedExperts.from_experts(make_experts(num_experts=1), format_config(name)))
        expected += alone
    assert weight_bytes(mixed) == expected
    # By hand for int8: a byte per weight and one fp32 scale per matrix row.
    assert weight_bytes(QuantizedExperts.from_experts(make_experts(num_experts=1), "int8")) == weights + 4 * (2 * F + D)
    # All in one format: the very bytes of QuantizedExperts.
    nf4 = MixedPrecisionExperts.from_experts(experts, ["nf4"] * 4)
    assert weight_bytes(nf4) == weight_bytes(QuantizedExperts.from_experts(experts, "nf4"))


def test_dtype_moves_keep_the_stored_formats():
    mixed = MixedPrecisionExperts.from_experts(make_experts(), FORMATS)
    before = weight_bytes(mixed)
    mixed.to(dtype=torch.float32)
    assert weight_bytes(mixed) == before and mixed.w_in["bf16"].weight_ENK.dtype == torch.bfloat16
    x_ND, tokens_per_expert_E = routed_rows()
    assert mixed(x_ND.bfloat16(), tokens_per_expert_E).dtype == torch.bfloat16


def test_a_model_of_mixed_experts_saves_and_loads_back_bit_for_bit(tmp_path):
    model = tiny_model()
    formats = [["bf16", "nf4-dq", "int8", "nf4-dq"], ["nf4-b256-dq"] * 4]
    quantize_experts_by_format(model, formats)
    path = tmp_path / "mixed.safetensors"
    save_quantized(model, path)
    loaded = load_quantized(path)

    input_ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    assert [layer.experts.expert_formats for layer in loaded.moe_layers] == formats
    with safe_open(str(path), "pt") as f:
        quantization = json.loads(f.metadata()[QUANTIZATION_KEY])
    assert quantization["config"] is None and quantization["modules"]["blocks.1.ffn.experts"] == "mixed_experts"


def test_bad_formats_are_named():
    experts = make_experts()
    with pytest.raises(ValueError, match="unknown expert format 'nf5'"):
        MixedPrecisionExperts.from_experts(experts, ["nf5"] * 4)
    with pytest.raises(ValueError, match=r"expert format 'nf4-b100': blocksize must be one of .* got blocksize=100"):
        format_config("nf4-b100")
    with pytest.raises(ValueError, match="'double_quant': True} apply to 4-bit modes"):
        format_config("int8-dq")
    with pytest.raises(ValueError, match=r"one format per expert \(4\), got 2"):
        MixedPrecisionExperts.from_experts(experts, ["nf4", "int8"])
    with pytest.raises(TypeError, match="GroupedExperts, got QuantizedExperts"):
        MixedPrecisionExperts.from_experts(QuantizedExperts.from_experts(experts, "nf4"), ["nf4"] * 4)
    model = tiny_model()
    with pytest.raises(ValueError, match="expert_formats has 1 layers, MoETransformer has 2 MoE layers"):
        quantize_experts_by_format(model, [["nf4"] * 4])
    with pytest.raises(ValueError, match="names 3 formats for blocks.2.ffn, which has 4 experts"):
        quantize_experts_by_format(model, [["nf4"] * 4, ["nf4"] * 3])
    quantize_model(model, "nf4")
    with pytest.raises(ValueError, match=r"blocks.1.ffn.experts is already quantised \(QuantizedExperts\)"):
        quantize_experts_by_format(model, [["nf4"] * 4] * 2)
