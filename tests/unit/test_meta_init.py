"""``meta_init``: a model given as a function (YAML: its ``class_path``/``init_args``) built on the meta device and
materialised in ``configure_model``, through the CLI against the ordinary build, and back from its checkpoint."""

import functools
from pathlib import Path

import torch
import yaml

from moe_lightning import MoELightningModule
from moe_lightning.cli import MoELightningCLI
from moe_lightning.inference import load_lightning_checkpoint
from moe_lightning.inference.export import build_model
from moe_lightning.inference.lightning_checkpoint import model_init_args
from moe_lightning.models import MoETransformer, MoETransformerConfig
from tests.unit.build_probe import BuildProbe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
META_INIT = "--model.init_args.meta_init=true"
CONFIG = MoETransformerConfig(vocab_size=32, dim=16, num_layers=2, num_heads=2, num_experts=4, expert_hidden_dim=8)


def fit(tmp_path: Path, *extra: str) -> tuple[MoELightningCLI, dict]:
    cli = MoELightningCLI(args=[
        "fit", "--config", str(TINY), "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--data.init_args.max_bytes=200000",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.callbacks+=tests.unit.build_probe.BuildProbe",
        *extra,
    ])
    (probe,) = [c for c in cli.trainer.callbacks if isinstance(c, BuildProbe)]
    return cli, probe.report


def test_a_yaml_model_with_meta_init_is_built_on_meta_and_trains_the_losses_of_the_ordinary_build(tmp_path):
    _, eager = fit(tmp_path / "eager")
    _, lazy = fit(tmp_path / "lazy", META_INIT)
    assert eager["meta_at_setup"] is False  # jsonargparse built it at parse time
    assert lazy["meta_at_setup"] is True and lazy["meta_at_fit_start"] is False
    assert len(lazy["losses"]) == 2
    assert lazy["losses"] == eager["losses"]


def test_a_meta_init_run_saves_its_config_and_loads_back_from_its_checkpoint(tmp_path):
    cli, _ = fit(tmp_path, META_INIT)
    log_dir = Path(cli.trainer.log_dir)
    saved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["meta_init"] is True
    assert saved["model"]["init_args"]["model"]["class_path"] == "moe_lightning.models.MoETransformer"
    checkpoint = log_dir / "checkpoints" / "last.ckpt"
    trained = cli.model.model.state_dict()

    from_config = load_lightning_checkpoint(checkpoint)
    assert from_config.state_dict().keys() == trained.keys()
    assert all(torch.equal(from_config.state_dict()[name], value) for name, value in trained.items())

    args = model_init_args(saved, log_dir / "config.yaml")
    builder = functools.partial(build_model, args["config"], args["router"])
    for model in (builder, builder()):  # the saved meta_init=True applies to the builder only
        reloaded = MoELightningModule.load_from_checkpoint(checkpoint, model=model)
        assert reloaded.hparams.meta_init is True
        assert all(torch.equal(reloaded.model.state_dict()[name], value) for name, value in trained.items())


def test_meta_init_decides_when_a_function_model_is_called_and_leaves_a_built_model_alone():
    def build():
        return MoETransformer(CONFIG)

    torch.manual_seed(0)
    eager = MoELightningModule(build)
    torch.manual_seed(0)
    lazy = MoELightningModule(build, meta_init=True)
    assert all(not p.is_meta for p in eager.parameters()) and all(p.is_meta for p in lazy.parameters())
    torch.manual_seed(1)  # the values are those of the point where the module was made
    lazy.configure_model()
    assert all(torch.equal(lazy.model.state_dict()[n], t) for n, t in eager.model.state_dict().items())
    built = MoETransformer(CONFIG)
    assert MoELightningModule(built, meta_init=True).model is built
