"""Kill ``moe-lightning fit`` with SIGKILL at seeded points, resume it with ``--ckpt_path last`` each time, and
check after every kill that each checkpoint on disk loads or is marked incomplete and that ``last`` never vanished
nor moved back.

Kill points, the i-th at a later step than the one before: ``step``, a seeded delay of up to 0.1 s after the
attempt has logged that step (anywhere in a step: forward, backward, optimizer, logging, checkpointing); ``write``,
the moment the next checkpoint's temporary ``.NAME.partial`` appears after it (the harness polls the directory; a
kill that landed while it still existed is counted as one during a write).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_lightning.checkpoint.atomic import INCOMPLETE_SUFFIXES, PARTIAL_SUFFIX
from moe_lightning.checkpoint.integrity import verify_manifest
from moe_lightning.checkpoint.sharded import load_sharded
from tests.chaos.loss_trace import read_trace

REPO = Path(__file__).resolve().parents[2]
ATTEMPT_TIMEOUT_S = 900


def fit_command(root: Path, attempt: int, max_steps: int, every_n_train_steps: int, devices: int) -> list[str]:
    """configs/tiny.yaml on a corpus of five batches an epoch (so runs cross epochs), a checkpoint every
    ``every_n_train_steps`` in ``root/checkpoints``, validation at each epoch end and every loss in
    ``root/trace.jsonl``. Each attempt has its own log directory (the CLI refuses to overwrite a saved config)."""
    command = [
        # The console script: Lightning's launcher starts the other ranks by running this command line again.
        str(Path(sys.executable).with_name("moe-lightning")), "fit", "--config", str(REPO / "configs/tiny.yaml"),
        f"--trainer.max_steps={max_steps}", "--trainer.logger=false", f"--trainer.default_root_dir={root / f'attempt{attempt}'}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.val_check_interval=1.0", "--trainer.limit_val_batches=1",
        "--data.init_args.batch_size=4", "--data.init_args.seq_len=32", "--data.init_args.max_bytes=800",
        "--trainer.callbacks+=moe_lightning.callbacks.CrashSafeCheckpoint",
        f"--trainer.callbacks.every_n_train_steps={every_n_train_steps}", f"--trainer.callbacks.dirpath={root / 'checkpoints'}",
        "--trainer.callbacks+=tests.chaos.loss_trace.LossTrace", f"--trainer.callbacks.path={root / 'trace.jsonl'}",
        "--ckpt_path=last",  # nothing to resume the first time: Lightning starts afresh
    ]
    if devices > 1:
        command += ["--trainer.strategy=expert_parallel", f"--trainer.devices={devices}", "--trainer.accelerator=cpu"]
    return command


@dataclass
class ChaosReport:
    kills: Counter = field(default_factory=Counter)  # by kill point: "step", "write"
    kills_during_write: int = 0
    attempts: int = 0
    checkpoints_checked: int = 0
    incomplete_marked: int = 0
    last_steps: list[int] = field(default_factory=list)  # the step last.ckpt named after each attempt

    @property
    def total_kills(self) -> int:
        return sum(self.kills.values())


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run_to_completion(root: Path, command: Callable[[int], list[str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "fit.log").open("ab") as log:
        subprocess.run(command(0), cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT, check=True,
                       timeout=ATTEMPT_TIMEOUT_S)


def run_with_kills(root: Path, command: Callable[[int], list[str]], max_steps: int, num_kills: int,
                   seed: int) -> ChaosReport:
    """Run ``command(attempt)`` until it finishes, SIGKILLing the first ``num_kills`` attempts at seeded points."""
    root.mkdir(parents=True, exist_ok=True)
    rng, report = random.Random(seed), ChaosReport()
    checkpoints = root / "checkpoints"
    while True:
        report.attempts += 1
        # The i-th kill comes at a later step than the one before, so every run gets its kills however fast it is.
        target = 1 + report.total_kills * (max_steps - 4) // num_kills
        kill = ("step", target, rng.uniform(0.0, 0.1)) if rng.random() < 0.5 else ("write", target)
        logged_before = len(read_trace(root / "trace.jsonl"))
        with (root / "fit.log").open("ab") as log:
            process = subprocess.Popen(command(report.attempts), cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # its own group: expert-parallel ranks die with it
            killed = report.total_kills < num_kills and _kill_at(process, kill, root, checkpoints, logged_before)
            returncode = process.wait(timeout=ATTEMPT_TIMEOUT_S)
        if killed:
            report.kills[kill[0]] += 1
            report.kills_during_write += any(p.name.endswith(PARTIAL_SUFFIX) for p in _entries(checkpoints))
        elif returncode != 0:
            raise AssertionError(f"attempt {report.attempts} failed with exit code {returncode}: see {root / 'fit.log'}")
        check_checkpoints(checkpoints, report)
        if not killed:
            return report


def _kill_at(process: subprocess.Popen, kill: tuple, root: Path, checkpoints: Path, logged_before: int) -> bool:
    """Wait for the kill point (this attempt has logged step ``kill[1]``; then a delay, or the next checkpoint
    write) and SIGKILL the process group; False if the process ended first."""
    deadline = time.monotonic() + ATTEMPT_TIMEOUT_S
    reached = False
    while process.poll() is None and time.monotonic() < deadline:
        if not reached:
            reached = any(step >= kill[1] for step, _ in read_trace(root / "trace.jsonl")[logged_before:])
            if reached and kill[0] == "step":
                time.sleep(kill[2])
                break
            time.sleep(0.005)
        elif any(p.name.endswith(PARTIAL_SUFFIX) for p in _entries(checkpoints)):
            break
        else:
            time.sleep(0.001)
    if process.poll() is not None:
        return False
    os.killpg(process.pid, signal.SIGKILL)
    return True


def _entries(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


def check_checkpoints(checkpoints: Path, report: ChaosReport) -> None:
    """Every entry loads, or is a hidden temporary name (being written, replaced or removed); ``last.ckpt``, once it
    existed, still names a checkpoint that loads, of a step no older than before."""
    last_step = None
    for path in sorted(_entries(checkpoints)):
        if path.name.startswith(".") and path.name.endswith(INCOMPLETE_SUFFIXES):
            report.incomplete_marked += 1
            continue
        step = load_step(path)
        report.checkpoints_checked += 1
        if path.name == "last.ckpt":
            assert path.is_symlink(), "last.ckpt should link the newest checkpoint"
            last_step = step
    if report.last_steps:
        assert last_step is not None, f"last.ckpt vanished (it named step {report.last_steps[-1]})"
        assert last_step >= report.last_steps[-1], f"last.ckpt moved back from step {report.last_steps[-1]} to {last_step}"
    if last_step is not None:
        report.last_steps.append(last_step)


def load_step(path: Path) -> int:
    """The global step of a complete checkpoint: a Lightning file, or a sharded directory matching its manifest."""
    if path.is_dir():
        verify_manifest(path, required=True)
        checkpoint, _ = load_sharded(path, ep_rank=0, ep_size=1)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return checkpoint["global_step"]


def assert_same_trace(chaos_trace: list[tuple[int, str]], reference_trace: list[tuple[int, str]]) -> int:
    """Every loss the killed-and-resumed runs logged, first tries and repeats alike, equals the uninterrupted run's
    loss of that step bit for bit, and every step was logged; returns how many steps were logged more than once."""
    reference = dict(reference_trace)
    assert len(reference) == len(reference_trace), "the uninterrupted run logged a step twice"
    mismatches = [(step, loss, reference.get(step)) for step, loss in chaos_trace if loss != reference.get(step)]
    assert not mismatches, f"(step, resumed loss, uninterrupted loss) differ: {mismatches}"
    assert {step for step, _ in chaos_trace} == set(reference)
    return len(chaos_trace) - len(reference)
