"""LoRA and QLoRA on a whole model: only adapters train, the counts follow from the sizes, merges keep the logits."""

import pytest
import torch

from moe_lightning.finetune import LoRAFineTuning, LoRAExperts, apply_lora, export_finetuned, merge_lora
from moe_lightning.inference.export import load_safetensors
from moe_lightning.inference.quantization import QuantizedExperts
from tests.unit.finetune.helpers import CONFIG, fit, snapshot, tiny_model, tiny_module

RANK = 4
D, F, E, L = CONFIG.dim, CONFIG.expert_hidden_dim, CONFIG.num_experts, CONFIG.num_layers
# Per block: q [D -> D], kv [D -> 2D], o [D -> D], each R * (in + out); per expert: in [D -> 2F], down [F -> D].
ATTENTION_ADAPTERS = RANK * ((D + D) + (D + 2 * D) + (D + D))
EXPERT_ADAPTERS = E * RANK * ((D + 2 * F) + (F + D))
FP32 = {"rtol": 1e-5, "atol": 1e-5}
"""Merged and adapted logits, fp32 (and nf4 with fp32 compute: bitsandbytes' CPU matmul uses the dequantised weight)."""


def base_name(name: str) -> str:
    """The pre-LoRA name of a base tensor: peft's layers keep theirs under ``base_layer``, LoRAExperts under ``base``."""
    return name.replace(".base_layer.", ".").replace(".experts.base.", ".experts.")


def randomise_adapters(model: torch.nn.Module) -> None:
    """LoRA's B starts at zero, which hides a wrong merge: give every adapter weight a value."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora" in name:
                param.normal_(std=0.05)


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["lora", "qlora"])
def test_only_adapters_train_and_every_base_tensor_stays_bit_identical(quantize, tmp_path):
    module = tiny_module()
    total_before = sum(p.numel() for p in module.parameters())
    callback = LoRAFineTuning(rank=RANK, quantize=quantize)
    callback.setup(None, module, "fit")  # prepared before the snapshot; fit's setup then leaves it alone
    before = snapshot(module)
    trainer = fit(module, [callback], tmp_path)

    after = snapshot(module)
    adapters = [name for name in after if "lora" in name]
    assert adapters and all(not torch.equal(after[name], before[name]) for name in adapters if "_B" in name)
    assert all(torch.equal(after[name], before[name]) for name in after if name not in adapters)
    trainable = L * (ATTENTION_ADAPTERS + EXPERT_ADAPTERS)
    held = sum(p.numel() for group in trainer.optimizers[0].param_groups for p in group["params"])
    assert held == trainable == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for name, p in module.named_parameters() if "lora" in name)
    if quantize:
        assert all(isinstance(layer.experts.base, QuantizedExperts) for layer in module.model.moe_layers)
    else:
        assert total_before + trainable == sum(p.numel() for p in module.parameters())


def test_callback_applies_once_and_keeps_the_base_model_names_under_the_adapters(tmp_path):
    module = tiny_module()
    names = set(snapshot(module))
    callback = LoRAFineTuning(rank=RANK)
    fit(module, [callback], tmp_path)
    callback.setup(None, module, "validate")  # a later stage in the same process adds nothing
    assert {base_name(name) for name in snapshot(module) if "lora" not in name} == names
    assert sum(isinstance(m, LoRAExperts) for m in module.modules()) == L


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["lora", "qlora"])
def test_merge_gives_plain_modules_with_the_adapted_logits(quantize):
    model = apply_lora(tiny_model(), rank=RANK, quantize=quantize)
    randomise_adapters(model)
    input_ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids).logits
        merged_model = merge_lora(model)
        merged = merged_model(input_ids).logits
        base = tiny_model()(input_ids).logits
    torch.testing.assert_close(merged, adapted, **FP32)
    assert (adapted - base).abs().max() > 1e-2  # the adapters matter, so the comparison above means something
    assert {type(m).__name__ for m in merged_model.modules()}.isdisjoint({"LoRAExperts", "Linear4bit", "ParamWrapper"})
    assert not any("lora" in name or "base_layer" in name for name in merged_model.state_dict())


def test_export_of_a_lora_run_loads_as_a_plain_model_with_the_adapted_logits(tmp_path):
    module = tiny_module()
    apply_lora(module, rank=RANK)
    randomise_adapters(module)
    input_ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    path = tmp_path / "merged.safetensors"
    export_finetuned(module, path)
    with torch.no_grad():
        torch.testing.assert_close(load_safetensors(path)(input_ids).logits, module.model(input_ids).logits, **FP32)
    assert any(isinstance(m, LoRAExperts) for m in module.modules())  # the run's own model is left adapted


def test_target_modules_that_match_nothing_are_named_before_anything_changes():
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['qproj', 'mlp'\] match no nn.Linear .* \['gate', 'head', 'kv_proj'"):
        apply_lora(model, target_modules=["q_proj", "qproj", "mlp"])
    assert snapshot(model).keys() == before.keys() and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank=0"),
        ({"alpha": -1.0}, "alpha=-1.0"),
        ({"quantize": "nf5"}, "quantize='nf5'"),
        ({"target_modules": [], "experts": False}, "nothing to adapt"),
    ],
)
def test_bad_lora_settings_are_refused_when_the_callback_is_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAFineTuning(**kwargs)
