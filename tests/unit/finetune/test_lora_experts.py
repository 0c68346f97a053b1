"""LoRAExperts: the grouped path equals the per-expert loop and peft's own 3-D LoRA, forward and backward; fresh
adapters compute the base; merged weights compute the adapted experts."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from moe_lightning.experts import GroupedExperts
from moe_lightning.finetune import LoRAExperts
from moe_lightning.inference.quantization import QuantizedExperts

E, D, F, R = 4, 32, 16, 4
TOKENS_PER_EXPERT = torch.tensor([3, 0, 6, 5])  # an expert without rows included
FP32 = {"rtol": 1e-5, "atol": 1e-5}  # fp32 sums in another order


def base_experts(quantized: bool):
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, F)
    return QuantizedExperts.from_experts(experts, "nf4") if quantized else experts


def adapted(base, implementation="auto"):
    torch.manual_seed(1)
    lora = LoRAExperts(base, rank=R, alpha=8.0, implementation=implementation)
    with torch.no_grad():  # B starts at zero; make the adapters matter
        lora.lora_in_B_ERH.normal_(std=0.1)
        lora.lora_down_B_ERD.normal_(std=0.1)
    return lora


def run(experts, x_ND):
    x_ND = x_ND.detach().clone().requires_grad_()
    y_ND = experts(x_ND, TOKENS_PER_EXPERT)
    y_ND.backward(torch.linspace(-1, 1, y_ND.numel()).view_as(y_ND))
    grads = {name: p.grad for name, p in experts.named_parameters() if p.requires_grad}
    return y_ND.detach(), x_ND.grad, grads


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_grouped_path_equals_the_loop_forward_and_backward(quantized):
    x_ND = torch.randn(int(TOKENS_PER_EXPERT.sum()), D, generator=torch.Generator().manual_seed(2))
    y_grouped, dx_grouped, grads_grouped = run(adapted(base_experts(quantized), "grouped_mm"), x_ND)
    y_loop, dx_loop, grads_loop = run(adapted(base_experts(quantized), "loop"), x_ND)
    torch.testing.assert_close(y_grouped, y_loop, **FP32)
    torch.testing.assert_close(dx_grouped, dx_loop, **FP32)
    assert sorted(grads_grouped) == ["lora_down_A_EFR", "lora_down_B_ERD", "lora_in_A_EDR", "lora_in_B_ERH"]
    for name in grads_grouped:
        torch.testing.assert_close(grads_grouped[name], grads_loop[name], **FP32)
    assert grads_grouped["lora_in_A_EDR"][1].abs().sum() == 0  # no rows, no gradient
    assert all(grads_grouped["lora_in_A_EDR"][e].abs().sum() > 0 for e in (0, 2, 3))


def test_bf16_grouped_path_equals_the_loop_within_bf16_rounding():
    x_ND = torch.randn(int(TOKENS_PER_EXPERT.sum()), D, generator=torch.Generator().manual_seed(2)).bfloat16()
    runs = []
    for implementation in ("grouped_mm", "loop"):
        torch.manual_seed(1)
        lora = LoRAExperts(base_experts(False).bfloat16(), rank=8, alpha=16.0, implementation=implementation)
        with torch.no_grad():
            lora.lora_in_B_ERH.normal_(std=0.1)
            lora.lora_down_B_ERD.normal_(std=0.1)
        runs.append(run(lora, x_ND))
    (y_grouped, dx_grouped, grads_grouped), (y_loop, dx_loop, grads_loop) = runs
    assert y_grouped.dtype == torch.bfloat16
    # Both round each product to bf16 (8 significant bits) once, in another summation order: a few ulps apart.
    bf16 = {"rtol": 2 ** -6, "atol": 2 ** -6 * float(y_loop.abs().max())}
    torch.testing.assert_close(y_grouped, y_loop, **bf16)
    torch.testing.assert_close(dx_grouped, dx_loop, rtol=2 ** -6, atol=2 ** -6 * float(dx_loop.abs().max()))
    for name, grad in grads_grouped.items():
        assert grad.dtype == torch.float32  # the adapters stay fp32 parameters
        torch.testing.assert_close(grad, grads_loop[name], rtol=2 ** -6, atol=2 ** -6 * float(grad.abs().max()))


def test_grouped_mm_refuses_a_rank_whose_rows_it_cannot_stride():
    x_ND = torch.randn(int(TOKENS_PER_EXPERT.sum()), D).bfloat16()
    with pytest.raises(ValueError, match=r"rank=4 in torch.bfloat16"):
        LoRAExperts(base_experts(False).bfloat16(), rank=4, implementation="grouped_mm")(x_ND, TOKENS_PER_EXPERT)
    auto = LoRAExperts(base_experts(False).bfloat16(), rank=4)  # "auto" takes the loop instead
    assert auto(x_ND, TOKENS_PER_EXPERT).shape == x_ND.shape


def test_equals_peft_lora_of_the_3d_expert_parameters():
    """peft's ParamWrapper adapts the same stacked weights by folding ``A B`` into them: an independent LoRA."""
    x_ND = torch.randn(int(TOKENS_PER_EXPERT.sum()), D, generator=torch.Generator().manual_seed(3))
    ours = adapted(base_experts(False))

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = base_experts(False)

        def forward(self, x_ND, tokens_per_expert_E):
            return self.experts(x_ND, tokens_per_expert_E)

    theirs = inject_adapter_in_model(
        LoraConfig(r=R, lora_alpha=8.0, target_parameters=["experts.w_in_EDH", "experts.w_down_EFD"]), Holder()
    )
    down, inner = theirs.experts, theirs.experts.base_layer  # nested: the outer wrapper adapts w_down_EFD
    with torch.no_grad():
        for wrapper, a_EKR, b_ERM in ((inner, ours.lora_in_A_EDR, ours.lora_in_B_ERH),
                                     (down, ours.lora_down_A_EFR, ours.lora_down_B_ERD)):
            assert wrapper.parameter_name == ("w_in_EDH" if wrapper is inner else "w_down_EFD")
            # For an [E, K, M] parameter peft's delta of expert e is scaling * B_e @ A_e with B_e = lora_B[:, :, e]
            # of lora_B viewed [K, R, E] and A_e = lora_A[e] of lora_A viewed [E, R, M]; ours is a_EKR[e] @ b_ERM[e].
            wrapper.lora_B["default"].weight.copy_(a_EKR.permute(1, 2, 0).reshape(a_EKR.shape[1], R * E))
            wrapper.lora_A["default"].weight.copy_(b_ERM.reshape(E * R, -1))
    y_ours, dx_ours, _ = run(ours, x_ND)
    y_theirs, dx_theirs, _ = run(theirs, x_ND)
    torch.testing.assert_close(y_ours, y_theirs, **FP32)
    torch.testing.assert_close(dx_ours, dx_theirs, **FP32)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_fresh_adapters_compute_exactly_the_base(quantized):
    base = base_experts(quantized)
    x_ND = torch.randn(int(TOKENS_PER_EXPERT.sum()), D, generator=torch.Generator().manual_seed(4))
    assert torch.equal(LoRAExperts(base)(x_ND, TOKENS_PER_EXPERT), base(x_ND, TOKENS_PER_EXPERT))


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "nf4"])
def test_merged_experts_compute_the_adapted_experts(quantized):
    lora = adapted(base_experts(quantized))
    x_ND = torch.randn(int(TOKENS_PER_EXPERT.sum()), D, generator=torch.Generator().manual_seed(5))
    merged = lora.merged_experts()
    assert isinstance(merged, GroupedExperts) and merged.w_in_EDH.dtype == torch.float32
    # nf4 on the CPU: bitsandbytes multiplies by the dequantised weight, so the merge is as exact as fp32 allows.
    torch.testing.assert_close(merged(x_ND, TOKENS_PER_EXPERT), lora(x_ND, TOKENS_PER_EXPERT), **FP32)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rank=0"):
        LoRAExperts(base_experts(False), rank=0)
    with pytest.raises(ValueError, match="'triton'"):
        LoRAExperts(base_experts(False), implementation="triton")
    with pytest.raises(TypeError, match="Linear"):
        LoRAExperts(torch.nn.Linear(2, 2))
