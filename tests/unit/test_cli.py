"""The CLI and the recipes in configs/: each instantiates, the CPU ones train, mistakes are named, runs reproduce."""

import json
import os
import platform
from pathlib import Path

import pytest
import torch

from moe_lightning.cli import MoELightningCLI
from tests.unit.helpers import LossRecorder

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CPU_CONFIGS = [c for c in CONFIGS if "accelerator: cpu" in c.read_text()]
TRACE_FILE = ROOT / "tests" / "fixtures" / "tiny_10_step_loss_trace.json"
ROUTER_ARGS = "--model.init_args.model.init_args.router.init_args"
MODEL_CONFIG = "--model.init_args.model.init_args.config"

QUICK = [
    "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=1",
]


def build(config: Path, *extra: str, tmp_path: Path) -> MoELightningCLI:
    args = ["--config", str(config), f"--trainer.default_root_dir={tmp_path}", *QUICK, *extra]
    if "ByteTextDataModule" in config.read_text():
        args.append("--data.init_args.max_bytes=200000")
    return MoELightningCLI(run=False, args=args, save_config_kwargs={"overwrite": True})


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_every_config_instantiates(config, tmp_path):
    # GPU recipes are multi-billion-parameter models: build them on the meta device, with a CPU trainer.
    on_gpu = config not in CPU_CONFIGS
    extra = ["--trainer.accelerator=cpu", "--trainer.precision=32-true"] if on_gpu else []
    with torch.device("meta" if on_gpu else "cpu"):
        cli = build(config, *extra, tmp_path=tmp_path)
    assert len(cli.model.model.moe_layers) == cli.model.model.config.num_layers


@pytest.mark.parametrize("config", CPU_CONFIGS, ids=lambda c: c.stem)
def test_cpu_configs_train_a_few_steps(config, tmp_path):
    cli = build(config, "--trainer.max_steps=3", "--trainer.val_check_interval=3", tmp_path=tmp_path)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_subcommands_run(subcommand, tmp_path):
    config = ROOT / "configs" / "synthetic-tasks.yaml"
    MoELightningCLI(
        args=[subcommand, "--config", str(config), f"--trainer.default_root_dir={tmp_path}", *QUICK,
              "--trainer.limit_test_batches=1", "--trainer.limit_predict_batches=1"],
        save_config_kwargs={"overwrite": True},
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        ([f"{ROUTER_ARGS}.num_experts_per_token=9"], "top_k=9 and num_experts=8"),
        ([f"{ROUTER_ARGS}.capacity_factor=0"], "capacity_factor=0"),
        ([f"{MODEL_CONFIG}.num_heads=3"], "dim=128 and num_heads=3"),
        ([f"{MODEL_CONFIG}.vocab_size=100"], "vocab_size=256 .* vocab_size=100"),
        (["--data.init_args.paths=[no/such/corpus.txt]"], "data path 'no/such/corpus.txt' does not exist"),
    ],
)
def test_invalid_settings_fail_before_training_with_the_values(extra, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        cli = build(ROOT / "configs" / "tiny.yaml", "--trainer.max_steps=1", *extra, tmp_path=tmp_path)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_unknown_router_class_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build(
            ROOT / "configs" / "tiny.yaml",
            "--model.init_args.model.init_args.router.class_path=moe_lightning.routing.NoSuchRouter",
            tmp_path=tmp_path,
        )
    assert "NoSuchRouter" in capsys.readouterr().err


def ten_step_loss_trace(tmp_path) -> list[float]:
    cli = build(ROOT / "configs" / "tiny.yaml", "--trainer.max_steps=10", "--trainer.limit_val_batches=0", tmp_path=tmp_path)
    recorder = LossRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return recorder.losses


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def test_fixed_seed_run_reproduces_its_recorded_loss_trace_bit_for_bit(tmp_path):
    """Set MOE_RECORD_TRACE=1 to re-record after an intended change.

    Bit-for-bit holds for the same torch build on the same CPU model; float kernels may pick other
    instruction paths on another CPU, so there the trace must agree to 1e-5 relative.
    """
    trace = ten_step_loss_trace(tmp_path / "a")
    assert len(trace) == 10
    assert ten_step_loss_trace(tmp_path / "b") == trace
    hex_trace = [float(x).hex() for x in trace]
    if os.environ.get("MOE_RECORD_TRACE") == "1":
        record = {"torch": torch.__version__, "cpu": cpu_model(), "loss_hex": hex_trace}
        TRACE_FILE.write_text(json.dumps(record, indent=1) + "\n")
    recorded = json.loads(TRACE_FILE.read_text())
    if recorded["torch"] != torch.__version__:
        pytest.skip(f"trace recorded with torch {recorded['torch']}, running {torch.__version__}")
    if recorded["cpu"] == cpu_model():
        assert hex_trace == recorded["loss_hex"]
    else:
        assert trace == pytest.approx([float.fromhex(x) for x in recorded["loss_hex"]], rel=1e-5)
