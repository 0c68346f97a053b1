"""The issue's command line: train configs/tiny.yaml on 2 CPU processes with expert parallelism, then resume
its checkpoint on 1 device and on 2; with meta_init, each rank builds only its own experts."""

import json
import os
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
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the ranks import tests.unit.build_probe
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_fit_on_two_processes_then_resume_on_one_and_on_two(tmp_path):
    fit(tmp_path, devices=2, max_steps=2)
    checkpoint = tmp_path / "runs" / "moe" / "version_0" / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "experts-00000-of-00002.safetensors", "experts-00001-of-00002.safetensors", "manifest.json", "meta.pt",
    ]
    for devices in (1, 2):
        log = fit(tmp_path, devices, 4, f"--ckpt_path={checkpoint}")
        assert "Restored all states" in log
        assert "step=4.ckpt" in log


MODEL = "--model.init_args.model.init_args.config"
# 2 blocks of 64 experts, 256 x 1024 SwiGLU: 403 MB of experts in fp32 (about 2 MB of dense tensors); short
# sequences and no checkpoint keep the two steps quick.
EXPERT_HEAVY = [f"{MODEL}.dim=256", f"{MODEL}.num_layers=2", f"{MODEL}.num_experts=64", f"{MODEL}.expert_hidden_dim=1024",
                "--data.init_args.seq_len=32", "--trainer.enable_checkpointing=false", "--trainer.logger=false"]
EXPERT_BYTES = 2 * 64 * 3 * 256 * 1024 * 4


@pytest.mark.slow
def test_meta_init_ranks_build_only_their_experts_and_train_the_losses_of_the_ordinary_build(tmp_path):
    reports = {}
    for name, extra in (("eager", []), ("meta", ["--model.init_args.meta_init=true"])):
        (tmp_path / name).mkdir()
        probe = {"class_path": "tests.unit.build_probe.BuildProbe", "init_args": {"out": f"{tmp_path}/{name}-{{rank}}.json"}}
        fit(tmp_path / name, 2, 2, *EXPERT_HEAVY, f"--trainer.callbacks+={json.dumps(probe)}", *extra)
        reports[name] = [json.loads((tmp_path / f"{name}-{rank}.json").read_text()) for rank in range(2)]
    for eager, meta in zip(reports["eager"], reports["meta"]):
        assert eager["meta_at_setup"] is False and meta["meta_at_setup"] is True
        assert set(meta["expert_rows"].values()) == {32} and meta["expert_rows"] == eager["expert_rows"]
        assert meta["losses"] == eager["losses"] and len(meta["losses"]) == 2
        # The ordinary build holds every expert before the strategy slices them; a meta-built rank never holds the
        # other rank's 201 MB (it draws them through one 16 MB buffer).
        assert eager["peak_rss_bytes"] - meta["peak_rss_bytes"] > 0.35 * EXPERT_BYTES
