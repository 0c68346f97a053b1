"""The issue's command line: train configs/tiny.yaml on 2 CPU processes with expert parallelism, then resume
its checkpoint on 1 device and on 2."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "--trainer.accelerator=cpu", "--trainer.strategy=expert_parallel", "--trainer.enable_progress_bar=false",
    "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--data.init_args.max_bytes=200000",
    "--data.init_args.batch_size=4",
]


def fit(cwd: Path, devices: int, max_steps: int, *extra: str) -> str:
    command = [str(Path(sys.executable).parent / "moe-lightning"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
               *SMALL, f"--trainer.devices={devices}", f"--trainer.max_steps={max_steps}", *extra]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_fit_on_two_processes_then_resume_on_one_and_on_two(tmp_path):
    fit(tmp_path, devices=2, max_steps=2)
    checkpoint = tmp_path / "runs" / "moe" / "version_0" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "experts-00000-of-00002.safetensors", "experts-00001-of-00002.safetensors", "meta.pt",
    ]
    for devices in (1, 2):
        log = fit(tmp_path, devices, 4, f"--ckpt_path={checkpoint}")
        assert "Restored all states" in log
        assert "step=4.ckpt" in log
