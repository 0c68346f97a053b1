"""Exports of fine-tuned runs: a transformers checkpoint of the merged model, and export mistakes named before training."""

import pytest
import torch

from moe_lightning.finetune import ExpertFineTuning, LoRAExperts, LoRAFineTuning
from moe_lightning.models.hf import export_hf, load_hf_model
from moe_lightning.module import MoELightningModule
from tests.unit.finetune.helpers import CONFIG, fit, snapshot, tiny_module


def test_hf_export_of_a_lora_run_loads_with_the_runs_logits(tmp_path):
    module = tiny_module()
    fit(module, [LoRAFineTuning(rank=4, export_path="hf", export_format="hf", hf_family="mixtral")], tmp_path)
    input_ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(tmp_path / "hf")(input_ids).logits, module.model(input_ids).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"export_format": "hf", "hf_family": "no-such-family"}, "no-such-family"),
        ({"export_format": "hf"}, "not imported from transformers .* pass family="),
        ({"export_format": "hf", "hf_family": "mixtral", "export_path": "taken"}, "taken exists and is not empty"),
    ],
)
def test_an_export_that_would_fail_is_named_before_any_step(options, message, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    module = tiny_module()
    before = snapshot(module)
    with pytest.raises(ValueError, match=message):
        fit(module, [ExpertFineTuning(**{"export_path": "out", **options})], tmp_path)
    assert all(torch.equal(value, before[name]) for name, value in snapshot(module).items())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


def test_unknown_export_format_is_refused():
    with pytest.raises(ValueError, match="export_format='onnx'"):
        LoRAFineTuning(export_format="onnx")


def test_a_run_started_from_a_transformers_checkpoint_fine_tunes_it(tmp_path):
    """``pretrained:`` builds the model in configure_model, after the callbacks' setup: the callback builds it first."""
    source = tiny_module().model
    export_hf(source, tmp_path / "base", "mixtral")
    module = MoELightningModule(pretrained=str(tmp_path / "base"), lr=1e-2, warmup_steps=0)
    assert module.model is None
    fit(module, [LoRAFineTuning(rank=4)], tmp_path / "run")
    assert sum(isinstance(m, LoRAExperts) for m in module.modules()) == CONFIG.num_layers
    base_layer = module.model.blocks[0].attn.q_proj.base_layer
    assert torch.equal(base_layer.weight, source.blocks[0].attn.q_proj.weight)  # the checkpoint's, frozen
