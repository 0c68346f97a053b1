"""configs/finetune-*.yaml: each recipe imports the tiny transformers checkpoint of examples/make_tiny_hf_checkpoint.py
(made here, in a temporary directory), runs `moe-lightning fit` for a few steps, trains what it says, and exports a
loadable merged model (LoRA's as a transformers checkpoint of the imported family). A missing checkpoint is named in
one line, with the script that writes one."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from moe_lightning.cli import DEBUG_ENV, MoELightningCLI, main
from moe_lightning.finetune import ESFTFineTuning, FineTuningCallback, LoRAExperts
from moe_lightning.inference.export import load_safetensors
from moe_lightning.inference.quantization import QuantizedExperts
from moe_lightning.models.hf import load_hf_model

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "configs").glob("finetune-*.yaml"))
SCRIPT = ROOT / "examples" / "make_tiny_hf_checkpoint.py"
STEPS = 2
QUICK = [
    f"--trainer.max_steps={STEPS}", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=1",
    "--data.init_args.batch_size=4", "--data.init_args.seq_len=32",
]


def load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_hf_checkpoint", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return load_script().main([str(tmp_path_factory.mktemp("hf") / "tiny-mixtral")])


def test_every_method_has_a_recipe_and_each_starts_from_the_scripts_path():
    assert [recipe.stem for recipe in RECIPES] == ["finetune-esft", "finetune-lora", "finetune-qlora"]
    for recipe in RECIPES:
        text = recipe.read_text()
        assert "    pretrained: runs/hf/tiny-mixtral\n" in text
        assert "examples/make_tiny_hf_checkpoint.py runs/hf/tiny-mixtral" in text


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.stem)
def test_recipe_fits_a_few_steps_from_the_checkpoint_and_exports_a_plain_model(recipe, checkpoint, tmp_path):
    cli = MoELightningCLI(
        args=["fit", "--config", str(recipe), f"--trainer.default_root_dir={tmp_path}",
              f"--model.init_args.pretrained={checkpoint}", *QUICK],
        save_config_kwargs={"overwrite": True},
    )
    assert cli.trainer.global_step == STEPS
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, FineTuningCallback))
    source = load_hf_model(checkpoint)  # the model before fine-tuning
    model = cli.model.model
    assert model.config == source.config
    layers = model.moe_layers
    D, F, E, L = source.config.dim, source.config.expert_hidden_dim, source.config.num_experts, source.config.num_layers
    if isinstance(callback, ESFTFineTuning):
        assert sorted(callback.selection) == list(range(L))
        chosen = sum(map(len, callback.selection.values()))
        assert 0 < chosen < L * E
        expected = chosen * (D * 2 * F + F * D)  # SwiGLU experts: [D, 2F] in, [F, D] down
    else:
        assert all(isinstance(layer.experts, LoRAExperts) for layer in layers)
        quantized = all(isinstance(layer.experts.base, QuantizedExperts) for layer in layers)
        assert quantized == ("qlora" in recipe.stem)
        # A rank-R adapter on each attention projection [in -> out] of the source, and on each expert's in [D -> 2F]
        # and down [F -> D].
        attention = [m for name, m in source.named_modules() if name.rsplit(".", 1)[-1] in callback.target_modules]
        assert len(attention) == 3 * L
        expected = callback.rank * (sum(m.in_features + m.out_features for m in attention)
                                    + L * E * ((D + 2 * F) + (F + D)))
    assert sum(p.numel() for p in cli.model.parameters() if p.requires_grad) == expected

    input_ids = torch.randint(0, source.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids).logits
        assert not torch.allclose(logits, source(input_ids).logits)  # it trained
        if callback.export_format == "hf":
            from transformers import AutoModelForCausalLM

            exported = AutoModelForCausalLM.from_pretrained(tmp_path / callback.export_path).eval()
            assert exported.config.model_type == "mixtral"  # the imported family, named nowhere in the recipe
            torch.testing.assert_close(exported(input_ids).logits, logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(load_hf_model(tmp_path / callback.export_path)(input_ids).logits, logits,
                                       rtol=1e-5, atol=1e-5)
        else:
            exported = load_safetensors(tmp_path / callback.export_path)
            torch.testing.assert_close(exported(input_ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_a_missing_checkpoint_is_named_in_one_line_with_the_script_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/hf/tiny-mixtral here
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "finetune-lora.yaml"), *QUICK])
    first, *rest = str(exit_info.value.code).splitlines()
    assert re.match(r"moe-lightning: error: pretrained='runs/hf/tiny-mixtral' does not exist: ", first)
    assert "examples/make_tiny_hf_checkpoint.py DIR" in first
    assert rest == [f"({DEBUG_ENV}=1 shows the traceback)"]


def test_the_script_covers_the_data_vocabulary_and_refuses_to_overwrite(checkpoint, capsys):
    from moe_lightning.data import SyntheticTasksDataModule

    config = load_hf_model(checkpoint).config
    assert config.vocab_size == SyntheticTasksDataModule().vocab_size and config.max_seq_len >= 256
    with pytest.raises(SystemExit) as exit_info:
        load_script().main([str(checkpoint)])
    assert exit_info.value.code == 2
    assert f"{str(checkpoint)!r} already exists and is not an empty directory" in capsys.readouterr().err
