"""bitsandbytes experts on CUDA in bf16: bitsandbytes' fused kernels against the dequantised weights, a quantised
model against its float self, and a save / load round trip that keeps every output bit.

Shape legend: N routed rows, D model dim, E experts.
"""

import pytest
import torch

from moe_lightning.experts import GroupedExperts
from moe_lightning.experts.activations import activate
from moe_lightning.inference.quantization.experts import QuantizedExperts
from moe_lightning.inference.quantization.export import load_quantized, save_quantized
from moe_lightning.inference.quantization.quantize import expert_weight_bytes, quantize_model
from moe_lightning.models import MoETransformer, MoETransformerConfig

pytestmark = pytest.mark.gpu

MODES = [("int8", {}), ("nf4", {}), ("fp4", {}), ("nf4", {"double_quant": True, "compute_dtype": "bfloat16"})]
IDS = ["int8", "nf4", "fp4", "nf4-double"]


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def routed_rows(num_experts, dim, rows_per_expert=(1, 0, 37, 300, 5, 64, 2, 128)):
    torch.manual_seed(1)
    counts = torch.tensor(rows_per_expert[:num_experts], device="cuda")
    return torch.randn(int(counts.sum()), dim, device="cuda", dtype=torch.bfloat16), counts


@pytest.mark.parametrize("mode, options", MODES, ids=IDS)
def test_cuda_bf16_experts_match_their_dequantised_weights(mode, options):
    torch.manual_seed(0)
    experts = GroupedExperts(8, 256, 512, init_std=0.05).cuda().eval()
    x_ND, tokens_per_expert_E = routed_rows(8, 256)
    quantized = QuantizedExperts.from_experts(experts, mode, **options).eval()
    w_in_EDH, w_down_EFD = quantized.dequantized_weights()
    with torch.no_grad():
        got = quantized(x_ND, tokens_per_expert_E)
        reference = torch.cat([
            activate(x_nD.float() @ w_in_EDH[e], "swiglu") @ w_down_EFD[e]
            for e, x_nD in enumerate(x_ND.split(tokens_per_expert_E.tolist()))
        ])
        exact = experts.float()(x_ND.float(), tokens_per_expert_E)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    # 4-bit: bf16 compute of the same weights (a few 2^-8 roundings); int8: plus the activations' 8-bit rounding.
    assert relative_error(got, reference) < (0.03 if mode == "int8" else 0.015)
    assert relative_error(got, exact) < {"int8": 0.04, "nf4": 0.25, "fp4": 0.3}[mode]


@pytest.mark.parametrize("mode, options", MODES, ids=IDS)
def test_cuda_quantized_model_round_trips_and_shrinks(tmp_path, mode, options):
    torch.manual_seed(0)
    config = MoETransformerConfig(vocab_size=256, dim=256, num_layers=2, num_heads=4, num_experts=8,
                                  expert_hidden_dim=512, max_seq_len=64)
    model = MoETransformer(config).to("cuda", torch.bfloat16).eval()
    input_ids = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.no_grad():
        float_logits = model(input_ids).logits
    bf16_bytes = expert_weight_bytes(model)
    quantize_model(model, mode, dense=True, **options)
    assert expert_weight_bytes(model) <= (0.55 if mode == "int8" else 0.35) * bf16_bytes
    with torch.no_grad():
        logits = model(input_ids).logits
    assert torch.isfinite(logits).all() and relative_error(logits, float_logits) < 0.5

    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    loaded = load_quantized(path).to("cuda", torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, logits)
