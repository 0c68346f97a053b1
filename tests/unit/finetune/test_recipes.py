"""configs/finetune-*.yaml: each recipe runs `moe-lightning fit` for a few steps, trains what it says, and exports a
loadable merged model (LoRA's as a transformers checkpoint). The model is shrunk here to keep the test fast; tests/unit/test_cli.py also runs every CPU
recipe at its own size."""

from pathlib import Path

import pytest
import torch

from moe_lightning.cli import MoELightningCLI
from moe_lightning.finetune import ESFTFineTuning, FineTuningCallback, LoRAExperts
from moe_lightning.inference.export import load_safetensors
from moe_lightning.inference.quantization import QuantizedExperts
from moe_lightning.models.hf import load_hf_model

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "configs").glob("finetune-*.yaml"))
QUICK = [
    "--trainer.max_steps=3", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=1",
    "--data.init_args.batch_size=4", "--data.init_args.seq_len=32",
    *(f"--model.init_args.model.init_args.config.{name}={value}"
      for name, value in (("dim", 64), ("num_layers", 2), ("expert_hidden_dim", 64))),
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
    config = cli.model.model.config
    D, F, E, L = config.dim, config.expert_hidden_dim, config.num_experts, config.num_layers
    if isinstance(callback, ESFTFineTuning):
        assert sorted(callback.selection) == list(range(L))
        chosen = sum(map(len, callback.selection.values()))
        assert 0 < chosen < L * E
        expected = chosen * (D * 2 * F + F * D)  # SwiGLU experts: [D, 2F] in, [F, D] down
    else:
        assert all(isinstance(layer.experts, LoRAExperts) for layer in layers)
        quantized = all(isinstance(layer.experts.base, QuantizedExperts) for layer in layers)
        assert quantized == ("qlora" in recipe.stem)
        # Adapters of q [D -> D], kv [D -> 2D], o [D -> D] and of each expert's in [D -> 2F] and down [F -> D].
        expected = L * callback.rank * ((D + D) + (D + 2 * D) + (D + D) + E * ((D + 2 * F) + (F + D)))
    assert sum(p.numel() for p in cli.model.parameters() if p.requires_grad) == expected

    if callback.export_format == "hf":
        exported = load_hf_model(tmp_path / callback.export_path)
    else:
        exported = load_safetensors(tmp_path / callback.export_path)
    input_ids = torch.randint(0, exported.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids).logits, cli.model.model(input_ids).logits, rtol=1e-5, atol=1e-5)
