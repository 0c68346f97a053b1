"""The user's path: `moe-lightning fit --config configs/tiny.yaml --trainer.strategy=deepspeed_moe` on 2 CPU processes,
then the checkpoint directory converted and loaded by the inference engine (with the run's config.yaml)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("moe_lightning_deepspeed")

from moe_lightning.inference.engine import load_model  # noqa: E402
from moe_lightning_deepspeed import convert  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_fit_by_strategy_name_on_two_processes_then_convert_and_load(tmp_path):
    command = [
        str(Path(sys.executable).parent / "moe-lightning"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.accelerator=cpu", "--trainer.strategy=deepspeed_moe", "--trainer.devices=2",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--data.init_args.max_bytes=200000", "--data.init_args.batch_size=4",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoints = tmp_path / "runs" / "moe" / "version_0" / "checkpoints"
    [saved] = [path for path in checkpoints.iterdir() if path.name.startswith("epoch=")]
    assert sorted(p.name for p in (saved / "checkpoint").glob("experts-*")) == [
        "experts-00000-of-00002.safetensors", "experts-00001-of-00002.safetensors",
    ]
    convert.main([str(saved), str(checkpoints / "converted.ckpt")])
    model = load_model(checkpoints / "converted.ckpt")  # architecture from the run's config.yaml
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 16))).logits
    assert logits.shape == (1, 16, 256) and torch.isfinite(logits).all()
