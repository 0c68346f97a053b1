"""configs/finetune-*.yaml: each recipe runs `moe-lightning fit` for a few steps and exports a loadable merged model."""

from pathlib import Path

import pytest
import torch

from moe_lightning.cli import MoELightningCLI
from moe_lightning.finetune import ESFTFineTuning, FineTuningCallback, LoRAExperts
from moe_lightning.inference.export import load_safetensors
from moe_lightning.inference.quantization import QuantizedExperts

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "configs").glob("finetune-*.yaml"))
QUICK = [
    "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=1",
    "--data.init_args.batch_size=4",
]


def test_every_method_has_a_recipe():
    assert [recipe.stem for recipe in RECIPES] == ["finetune-esft", "finetune-lora", "finetune-qlora"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.stem)
def test_recipe_fits_a_few_steps_and_exports_a_plain_model(recipe, tmp_path):
    cli = MoELightningCLI(
        args=["fit", "--config", str(recipe), f"--trainer.default_root_dir={tmp_path}", *QUICK],
        save_config_kwargs={"overwrite": True},
    )
    assert cli.trainer.global_step == 3
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, FineTuningCallback))
    layers = cli.model.model.moe_layers
    if isinstance(callback, ESFTFineTuning):
        assert sorted(callback.selection) == list(range(len(layers)))
        assert sum(map(len, callback.selection.values())) < len(layers) * layers[0].num_experts
    else:
        assert all(isinstance(layer.experts, LoRAExperts) for layer in layers)
        quantized = all(isinstance(layer.experts.base, QuantizedExperts) for layer in layers)
        assert quantized == ("qlora" in recipe.stem)

    exported = load_safetensors(tmp_path / "finetuned.safetensors")
    trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in exported.parameters()) / 4
    input_ids = torch.randint(0, exported.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids).logits, cli.model.model(input_ids).logits, rtol=1e-5, atol=1e-5)
