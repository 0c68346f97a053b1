"""bitsandbytes int8 / NF4 / FP4 experts: exact against their dequantised weights, within the format's error of the
float weights, swapped into a model without touching routers, norms, embeddings or the head, saved and loaded back
bit for bit, and the ``quantize`` command on a tiny exported model.

Shape legend: N routed rows, D model dim, F expert hidden dim, H input-projection width (2F for SwiGLU), E experts.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from moe_lightning.experts import GroupedExperts
from moe_lightning.experts.activations import activate
from moe_lightning.inference.export import export_safetensors, load_safetensors
from moe_lightning.inference.quantization.cli import quantize_main
from moe_lightning.inference.quantization.config import QuantizationConfig
from moe_lightning.inference.quantization.experts import QuantizedExperts
from moe_lightning.inference.quantization.export import (
    QUANTIZATION_KEY,
    is_quantized_file,
    load_quantized,
    save_quantized,
)
from moe_lightning.inference.quantization.linear import QuantizedLinear
from moe_lightning.inference.quantization.quantize import (
    dense_linear_names,
    expert_weight_bytes,
    quantize_model,
    weight_bytes,
)
from moe_lightning.routing.base import Router

from .conftest import tiny_model

bnb = pytest.importorskip("bitsandbytes")
functional = bnb.functional

CASES = [
    ("int8", {}, "swiglu"),
    ("nf4", {}, "swiglu"),
    ("fp4", {}, "swiglu"),
    ("nf4", {"double_quant": True, "blocksize": 128}, "swiglu"),
    ("fp4", {"blocksize": 32}, "gelu"),
]
CASE_IDS = ["int8", "nf4", "fp4", "nf4-double-128", "fp4-32-gelu"]


def make_experts(activation="swiglu", num_experts=4, dim=64, hidden_dim=96):
    torch.manual_seed(0)
    return GroupedExperts(num_experts, dim, hidden_dim, activation, implementation="loop", init_std=0.05).eval()


def routed_rows(dim=64):
    """40 rows for 4 experts, one of which gets none; a few activations beyond LLM.int8's outlier threshold."""
    torch.manual_seed(1)
    x_ND = torch.randn(40, dim)
    x_ND[3, 5] = x_ND[30, 5] = 9.0
    return x_ND, torch.tensor([10, 0, 18, 12])


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def int8_reference_matmul(x_MK, w_NK, threshold):
    """LLM.int8 written out: int8 rows of ``w`` and of ``x`` with absmax scales, the exact integer product rescaled,
    plus the outlier columns of ``x`` (|x| >= threshold) against the dequantised weight in fp16."""
    CB, SCB, _ = functional.int8_vectorwise_quant(w_NK.to(torch.float16))
    x16 = x_MK.to(torch.float16)
    CA, SCA, outliers = functional.int8_vectorwise_quant(x16.clone(), threshold=threshold)
    y = (CA.double() @ CB.double().T) * (SCA.double()[:, None] * SCB.double()[None, :]) / 127**2
    if outliers is not None and outliers.numel():
        w_deq = CB.double() * SCB.double()[:, None] / 127
        y += x16[:, outliers].double() @ w_deq[:, outliers].T
    return y.to(torch.float16)


def dequantised_reference(experts, mode, options, x_ND, tokens_per_expert_E):
    """Each expert's weights quantised and dequantised here with bitsandbytes.functional, then the plain loop."""
    config = QuantizationConfig(mode, **options)
    outputs = []
    for e, x_nD in enumerate(x_ND.split(tokens_per_expert_E.tolist())):
        w_in_HD, w_down_DF = experts.w_in_EDH[e].T.contiguous(), experts.w_down_EFD[e].T.contiguous()
        if mode == "int8":
            h_nH = int8_reference_matmul(x_nD, w_in_HD, config.threshold)
            y_nD = int8_reference_matmul(activate(h_nH, experts.activation), w_down_DF, config.threshold)
        else:
            # Round trips of the flattened weights: bitsandbytes' CPU kernel dequantises a 2-D matrix in per-row blocks,
            # which differ from quantize_4bit's when a row is not a whole number of blocks.
            w_in_HD, w_down_DF = (
                functional.dequantize_4bit(*functional.quantize_4bit(
                    w.reshape(-1), blocksize=config.blocksize, compress_statistics=config.double_quant, quant_type=mode
                )).view(w.shape)
                for w in (w_in_HD, w_down_DF)
            )
            y_nD = activate(x_nD @ w_in_HD.T, experts.activation) @ w_down_DF.T
        outputs.append(y_nD.float())
    return torch.cat(outputs)


def activation_rounding_error(x_ND, tokens_per_expert_E, inputs, quantized):
    """Relative error of LLM.int8's rounding of ``inputs(e, x_nD)``, the activations entering one projection."""
    squared_error = squared_norm = 0.0
    for e, x_nD in enumerate(x_ND.split(tokens_per_expert_E.tolist())):
        if len(x_nD):
            a = inputs(e, x_nD)
            codes, scales, outliers = functional.int8_vectorwise_quant(a.half(), threshold=quantized.config.threshold)
            rounded = functional.int8_vectorwise_dequant(codes, scales)
            if outliers is not None and outliers.numel():
                rounded[:, outliers] = a[:, outliers]  # outlier columns go through the fp16 matmul instead
            squared_error += (rounded - a).square().sum().item()
            squared_norm += a.square().sum().item()
    return math.sqrt(squared_error / squared_norm)


@pytest.mark.parametrize("mode, options, activation", CASES, ids=CASE_IDS)
def test_experts_equal_the_dequantised_reference(mode, options, activation):
    experts = make_experts(activation)
    x_ND, tokens_per_expert_E = routed_rows()
    quantized = QuantizedExperts.from_experts(experts, mode, **options).eval()
    with torch.no_grad():
        got = quantized(x_ND, tokens_per_expert_E)
        want = dequantised_reference(experts, mode, options, x_ND, tokens_per_expert_E)
    assert got.shape == x_ND.shape and got.dtype == x_ND.dtype
    # 4-bit: the same dequantised weights and an fp32 matmul, so only summation order differs. int8: fp16 outputs
    # of each projection (2^-11 relative), rounded at slightly different points.
    assert relative_error(got, want) < (1e-6 if mode != "int8" else 2e-3)


@pytest.mark.parametrize("mode, options, activation", CASES, ids=CASE_IDS)
def test_experts_stay_within_the_format_error_of_the_float_weights(mode, options, activation):
    experts = make_experts(activation)
    x_ND, tokens_per_expert_E = routed_rows()
    quantized = QuantizedExperts.from_experts(experts, mode, **options).eval()
    w_in_EDH, w_down_EFD = quantized.dequantized_weights()

    # Per weight: rounding to the nearest level errs by at most half the widest gap between levels, times the scale
    # (the block absmax for 4-bit, the row absmax / 127 for int8, where the fp16 cast of the weight adds 2^-11).
    for matrices, w_EDX, deq_EDX in ((quantized.w_in_EHD, experts.w_in_EDH, w_in_EDH),
                                     (quantized.w_down_EDF, experts.w_down_EFD, w_down_EFD)):
        w_ENK, error_ENK = w_EDX.detach().transpose(1, 2), (deq_EDX - w_EDX.detach()).transpose(1, 2).abs()
        if mode == "int8":
            scale_EN = w_ENK.abs().amax(-1) / 127
            assert (error_ENK <= 0.5 * scale_EN[..., None] + w_ENK.abs() * 2**-11 + 1e-7).all()
        elif not options.get("double_quant"):  # nested scales are themselves quantised: no per-weight bound
            code = matrices.code_Q.sort().values
            half_gap = (code[1:] - code[:-1]).max() / 2
            blocksize = quantized.config.blocksize
            absmax_EB = w_ENK.reshape(w_ENK.shape[0], -1, blocksize).abs().amax(-1)
            assert (error_ENK.reshape(absmax_EB.shape + (blocksize,)) <= half_gap * absmax_EB[..., None] + 1e-7).all()

    # Whole weights: the relative (Frobenius) error of Gaussian weights is a property of the format.
    weight_errors = [relative_error(w_in_EDH, experts.w_in_EDH), relative_error(w_down_EFD, experts.w_down_EFD)]
    expected = {"int8": 0.01, "nf4": 0.11, "fp4": 0.14}[mode]
    assert max(weight_errors) < expected

    # Output: to first order each quantised operand adds its own independent relative error, gate and up (SwiGLU) each
    # carrying the input projection's; int8 also rounds the activations into each projection. 1.5x covers the
    # activation's slope and sampling noise.
    operands = [weight_errors[0]] * (2 if activation == "swiglu" else 1) + [weight_errors[1]]
    if mode == "int8":
        operands += [activation_rounding_error(x_ND, tokens_per_expert_E, lambda e, x_nD: x_nD, quantized),
                     activation_rounding_error(x_ND, tokens_per_expert_E,
                                               lambda e, x_nD: activate(x_nD @ w_in_EDH[e], activation), quantized)]
    with torch.no_grad():
        got = quantized(x_ND, tokens_per_expert_E)
        want = experts(x_ND, tokens_per_expert_E)
    assert relative_error(got, want) < 1.5 * math.sqrt(sum(e**2 for e in operands))


def test_4bit_experts_pass_gradients_to_their_input():
    experts = make_experts()
    x_ND, tokens_per_expert_E = routed_rows()
    quantized = QuantizedExperts.from_experts(experts, "nf4")
    w_in_EDH, w_down_EFD = quantized.dequantized_weights()
    reference = make_experts()
    reference.w_in_EDH.data, reference.w_down_EFD.data = w_in_EDH, w_down_EFD
    grads = []
    for module in (quantized, reference):
        x = x_ND.clone().requires_grad_()
        module(x, tokens_per_expert_E).square().sum().backward()
        grads.append(x.grad)
    assert relative_error(*grads) < 1e-5


def test_keep_experts_and_dtype_moves():
    experts = make_experts()
    x_ND, tokens_per_expert_E = routed_rows()
    quantized = QuantizedExperts.from_experts(experts, "nf4", double_quant=True)
    full = quantized(x_ND, tokens_per_expert_E)
    quantized.keep_experts(2, 4)
    assert quantized.num_experts == 2
    assert torch.equal(quantized(x_ND[10:], tokens_per_expert_E[2:]), full[10:])
    quantized.to(dtype=torch.bfloat16)  # moves, never recasts, the float32 scales and code tables
    assert {buffer.dtype for buffer in quantized.buffers()} == {torch.uint8, torch.float32}
    assert quantized(x_ND[10:].bfloat16(), tokens_per_expert_E[2:]).dtype == torch.bfloat16


def test_nf4_experts_take_at_most_035_of_their_bf16_bytes():
    torch.manual_seed(0)
    experts = GroupedExperts(num_experts=4, dim=512, hidden_dim=1024).to(torch.bfloat16)
    bf16_bytes = weight_bytes(experts)
    ratios = {
        name: weight_bytes(QuantizedExperts.from_experts(experts, mode, **options)) / bf16_bytes
        for name, mode, options in (("nf4", "nf4", {}), ("nf4-double", "nf4", {"double_quant": True}),
                                    ("int8", "int8", {}))
    }
    # 4 bits + one fp32 absmax per 64 weights = 4.5 of 16 bits; double quantisation: 8-bit absmax + fp32 per 256.
    assert ratios["nf4"] == pytest.approx(4.5 / 16, rel=1e-3) and ratios["nf4"] <= 0.35
    assert ratios["nf4-double"] == pytest.approx((4 + 8 / 64 + 32 / 64 / 256) / 16, rel=1e-3)
    assert ratios["int8"] == pytest.approx(8 / 16, rel=1e-2)  # + one fp32 scale per row


def test_quantize_model_keeps_routers_norms_embeddings_and_head():
    model = tiny_model(num_shared_experts=1, shared_expert_gate=True)
    kept = {name: (type(module), {p.dtype for p in module.parameters()})
            for name, module in model.named_modules()
            if isinstance(module, (Router, nn.RMSNorm, nn.Embedding))
            or name == "head" or name.endswith("shared_experts.gate")}
    expert_bytes = expert_weight_bytes(model)
    quantize_model(model, "nf4", dense=True)

    for name, (cls, dtypes) in kept.items():
        module = model.get_submodule(name)
        assert type(module) is cls and {p.dtype for p in module.parameters()} == dtypes, name
    assert all(isinstance(layer.experts, QuantizedExperts) for layer in model.moe_layers)
    assert isinstance(model.blocks[0].ffn.in_proj, QuantizedLinear)  # the dense FFN of first_k_dense
    assert isinstance(model.blocks[1].attn.q_proj, QuantizedLinear)
    assert isinstance(model.blocks[1].ffn.shared_experts.mlp.down_proj, QuantizedLinear)
    assert type(model.blocks[1].ffn.router.gate) is nn.Linear
    float_linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert all(name.endswith(("gate", "head")) for name in float_linears)
    assert expert_weight_bytes(model) < 0.2 * expert_bytes  # fp32 -> 4.5 bits per weight, plus code tables

    experts_only = quantize_model(tiny_model(), "int8")
    assert type(experts_only.blocks[1].attn.q_proj) is nn.Linear
    with pytest.raises(ValueError, match="already quantised"):
        quantize_model(experts_only, "nf4")


def test_dense_linear_names_skip_a_tied_head():
    names = dense_linear_names(tiny_model(tie_embeddings=True))
    assert "head" not in names and not any("router" in name for name in names)
    assert "blocks.0.ffn.in_proj" in names and "blocks.2.attn.o_proj" in names


@pytest.mark.parametrize(
    "mode, options", [("int8", {}), ("nf4", {"double_quant": True}), ("fp4", {"compute_dtype": "bfloat16"})]
)
def test_save_then_load_quantized_gives_identical_outputs(tmp_path, mode, options):
    model = quantize_model(tiny_model(num_shared_experts=1), mode, dense=True, **options)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    loaded = load_quantized(path)

    input_ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    assert is_quantized_file(path)
    with safe_open(str(path), "pt") as f:
        quantization = json.loads(f.metadata()[QUANTIZATION_KEY])
    assert quantization["config"] == QuantizationConfig(mode, **options).as_dict()
    assert quantization["modules"]["blocks.1.ffn.experts"] == "experts"
    assert quantization["modules"]["blocks.1.attn.q_proj"] == "linear"
    with pytest.raises(ValueError, match="not an export_safetensors file"):
        load_safetensors(path)


def test_load_quantized_refuses_a_plain_export(tmp_path):
    path = tmp_path / "plain.safetensors"
    export_safetensors(tiny_model(), path)
    assert not is_quantized_file(path)
    with pytest.raises(ValueError, match="plain export, load it with load_safetensors"):
        load_quantized(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_quantized(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no quantised module"):
        save_quantized(tiny_model(), tmp_path / "out.safetensors")


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "nf5"}, "mode='nf5'"),
    ({"mode": "nf4", "blocksize": 100}, "blocksize=100"),
    ({"mode": "nf4", "compute_dtype": "int8"}, "compute_dtype='int8'"),
    ({"mode": "nf4", "threshold": 6.0}, "threshold=6.0"),
    ({"mode": "int8", "blocksize": 64}, "'blocksize': 64"),
    ({"mode": "int8", "double_quant": True}, "double_quant"),
    ({"mode": "int8", "threshold": -1.0}, "threshold=-1.0"),
])
def test_bad_quantization_configs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        QuantizationConfig(**kwargs)


def test_bad_inputs_are_named():
    experts = make_experts()
    with pytest.raises(TypeError, match="blcksize"):
        QuantizedExperts.from_experts(experts, "nf4", blcksize=64)
    with pytest.raises(TypeError, match="GroupedExperts, got Linear"):
        QuantizedExperts.from_experts(nn.Linear(2, 2), "nf4")
    with pytest.raises(ValueError, match=r"4 counts summing to the 40 rows, got \[10, 10\]"):
        QuantizedExperts.from_experts(experts, "nf4")(torch.randn(40, 64), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="Sequential has no MoELayer"):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), "nf4")


@pytest.fixture
def exported_byte_model(tmp_path):
    path = tmp_path / "tiny.safetensors"
    export_safetensors(tiny_model(vocab_size=256, max_seq_len=64), path)
    return path


def test_quantize_command_prints_the_table_and_writes_a_loadable_file(exported_byte_model, tmp_path, capsys):
    text = tmp_path / "eval.txt"
    text.write_bytes(b"def f(x):\n    return x * 2\n" * 40)
    output = tmp_path / "tiny-nf4.safetensors"
    quantize_main([str(exported_byte_model), "--mode", "nf4", "--output", str(output), "--eval-text", str(text),
                   "--eval-batches", "2", "--eval-batch-size", "2", "--eval-seq-len", "32", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "expert weights" in printed and "val perplexity" in printed and f"wrote {output}" in printed
    row = next(line for line in printed.splitlines() if line.startswith("expert weights"))
    assert float(row.split()[-1]) < 0.2  # fp32 -> nf4
    row = next(line for line in printed.splitlines() if line.startswith("val perplexity"))
    before, after = (float(value) for value in row.split()[2:4])
    assert math.isfinite(before) and math.isfinite(after) and before > 1 and after > 1

    loaded = load_quantized(output)
    assert all(isinstance(layer.experts, QuantizedExperts) for layer in loaded.moe_layers)
    assert type(loaded.blocks[1].attn.q_proj) is nn.Linear


def test_quantize_command_defaults_to_the_stdlib_validation_text(exported_byte_model, tmp_path, capsys):
    output = tmp_path / "tiny-int8.safetensors"
    quantize_main([str(exported_byte_model), "--mode", "int8", "--output", str(output), "--dense",
                   "--eval-batches", "1", "--eval-batch-size", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "val perplexity" in printed and "not measured" not in printed
    assert isinstance(load_quantized(output).blocks[1].attn.q_proj, QuantizedLinear)


@pytest.mark.parametrize("args, message", [
    (["--mode", "nf5"], "invalid choice: 'nf5'"),
    (["--mode", "int8", "--blocksize", "64"], "'blocksize': 64"),
    (["--mode", "nf4", "--output", "out.pt"], "out.pt must end in .safetensors"),
])
def test_quantize_command_names_bad_options(exported_byte_model, tmp_path, capsys, args, message):
    argv = [str(exported_byte_model), "--output", str(tmp_path / "out.safetensors"), *args]
    with pytest.raises(SystemExit):
        quantize_main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, message", [("missing.safetensors", "does not exist"), ("model.bin", "model.bin must be")]
)
def test_quantize_command_names_a_bad_checkpoint(tmp_path, capsys, name, message):
    checkpoint = tmp_path / name
    if name.endswith(".bin"):
        checkpoint.write_bytes(b"")
    with pytest.raises(SystemExit):
        quantize_main([str(checkpoint), "--mode", "nf4", "--output", str(tmp_path / "out.safetensors")])
    assert message in capsys.readouterr().err
