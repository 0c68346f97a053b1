"""The CLI and the recipes in configs/: each instantiates, the CPU ones train, mistakes are named, runs reproduce."""

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_lightning.cli import DEBUG_ENV, MoELightningCLI, main, remove_unstarted_log_dir
from tests.unit.helpers import LossRecorder

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CPU_CONFIGS = [c for c in CONFIGS if "accelerator: cpu" in c.read_text()]
TRACE_FILE = ROOT / "tests" / "fixtures" / "tiny_10_step_loss_trace.json"
ROUTER_ARGS = "--model.init_args.model.init_args.router.init_args"
MODEL_CONFIG = "--model.init_args.model.init_args.config"


def unless_pretrained(configs: list[Path]) -> list:
    """``configs``, those that import a checkpoint (``pretrained:``) skipped: tests/unit/finetune/test_recipes.py makes
    the checkpoint they name and runs them."""
    reason = "imports a checkpoint made by examples/make_tiny_hf_checkpoint.py; run in tests/unit/finetune/test_recipes.py"
    return [pytest.param(c, id=c.stem, marks=pytest.mark.skip(reason=reason)) if "\n    pretrained: " in c.read_text()
            else pytest.param(c, id=c.stem) for c in configs]


QUICK = [
    "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=1",
]


def build(config: Path, *extra: str, tmp_path: Path) -> MoELightningCLI:
    args = ["--config", str(config), f"--trainer.default_root_dir={tmp_path}", *QUICK, *extra]
    if "ByteTextDataModule" in config.read_text():
        args.append("--data.init_args.max_bytes=200000")
    return MoELightningCLI(run=False, args=args, save_config_kwargs={"overwrite": True})


@pytest.mark.parametrize("config", unless_pretrained(CONFIGS))
def test_every_config_instantiates(config, tmp_path):
    # GPU recipes are multi-billion-parameter models: build them on the meta device, with a CPU trainer.
    on_gpu = config not in CPU_CONFIGS
    extra = ["--trainer.accelerator=cpu", "--trainer.precision=32-true"] if on_gpu else []
    with torch.device("meta" if on_gpu else "cpu"):
        cli = build(config, *extra, tmp_path=tmp_path)
    assert len(cli.model.model.moe_layers) == cli.model.model.config.num_layers


@pytest.mark.parametrize("config", unless_pretrained(CPU_CONFIGS))
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


TINY = ROOT / "configs" / "tiny.yaml"
ONE_STEP = ["--trainer.max_steps=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--data.init_args.max_bytes=200000"]
CONFIG_MISTAKES = [
    ([f"{ROUTER_ARGS}.num_experts_per_token=7", f"{MODEL_CONFIG}.num_experts=6"], r"top_k=7 and num_experts=6"),
    ([f"{MODEL_CONFIG}.num_heads=5", f"{MODEL_CONFIG}.dim=48"], r"dim=48 and num_heads=5"),
    ([f"{MODEL_CONFIG}.vocab_size=100"], r"vocab_size=256 .* vocab_size=100"),
]


def fit_args(runs: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(TINY), f"--trainer.logger.init_args.save_dir={runs}", *ONE_STEP, *extra]


@pytest.mark.parametrize("extra, message", CONFIG_MISTAKES)
def test_a_config_mistake_exits_with_one_message_and_leaves_no_run_directory(extra, message, tmp_path, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path / "runs", *extra))
    first, *rest = str(exit_info.value.code).splitlines()
    assert re.search(message, first) and first.startswith("moe-lightning: error: ")
    assert rest == [f"({DEBUG_ENV}=1 shows the traceback)"]
    assert not (tmp_path / "runs").exists()


def test_the_debug_variable_shows_the_error_itself(tmp_path, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="vocab mismatch"):
        main(fit_args(tmp_path / "runs", f"{MODEL_CONFIG}.vocab_size=100"))


def test_the_console_shows_the_message_once_without_a_traceback(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != DEBUG_ENV}
    args = fit_args(tmp_path / "runs", f"{MODEL_CONFIG}.num_heads=5", f"{MODEL_CONFIG}.dim=48")
    done = subprocess.run([Path(sys.executable).parent / "moe-lightning", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and done.stderr.count("dim=48 and num_heads=5") == 1
    assert len((done.stdout + done.stderr).splitlines()) <= 4


def test_help_documents_the_debug_variable(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert f"{DEBUG_ENV}=1" in capsys.readouterr().out


def test_only_a_log_directory_without_results_is_removed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    def run_dir(name: str, scalar: bool = False, extra_file: str | None = None) -> Path:
        log_dir = tmp_path / "runs" / name
        writer = SummaryWriter(log_dir)
        if scalar:
            writer.add_scalar("train/loss", 1.0, 0)
        writer.close()
        (log_dir / "config.yaml").write_text("seed_everything: 0\n")
        if extra_file:
            (log_dir / extra_file).write_text("x")
        return log_dir

    with_scalar, with_checkpoint, empty = run_dir("a", scalar=True), run_dir("b", extra_file="last.ckpt"), run_dir("c")
    for log_dir in (with_scalar, with_checkpoint, empty):
        remove_unstarted_log_dir(log_dir, "config.yaml", tmp_path)
    assert with_scalar.is_dir() and with_checkpoint.is_dir() and len(list(with_scalar.iterdir())) == 2
    assert not empty.exists() and (tmp_path / "runs").is_dir()


def test_layer_overrides_recipe_trains_and_its_export_loads_with_the_same_logits(tmp_path):
    from moe_lightning.inference import load_lightning_checkpoint, load_safetensors

    runs = tmp_path / "runs"
    main(["fit", "--config", str(ROOT / "configs" / "tiny-layer-overrides.yaml"), f"--trainer.logger.init_args.save_dir={runs}",
          "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=3", *ONE_STEP[1:]])
    (checkpoint,) = runs.glob("moe/version_0/checkpoints/last.ckpt")
    main(["export", str(checkpoint), str(tmp_path / "model.safetensors")])
    trained, exported = load_lightning_checkpoint(checkpoint).eval(), load_safetensors(tmp_path / "model.safetensors").eval()
    assert [type(layer.router).__name__ for layer in exported.moe_layers] == [
        "TopKRouter", "ExpertChoiceRouter", "TopKRouter", "TopKRouter"]
    assert [layer.num_experts for layer in exported.moe_layers] == [8, 16, 8, 8]
    assert exported.moe_layers[3].router.num_experts_per_token == 1
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
