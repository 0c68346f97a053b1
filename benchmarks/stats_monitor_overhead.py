"""Step-time cost of RouterStatsMonitor at its default interval: the same training run with and without it.

    PYTHONPATH=. python benchmarks/stats_monitor_overhead.py [--config configs/tiny.yaml] [--steps 200] [--repeats 3]

Both arms build the recipe through the CLI (TensorBoard logger on, validation off) and alternate in ABBA order,
repeats times, so a steady drift of the machine hits both alike; the table gives the median seconds per step of each
arm and the ratio. Where runs differ by more than the monitor costs, that ratio is mostly noise, so the monitor arm
also times the monitor's own hook (synchronising the GPU around it): its share of the run's time is the direct cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from lightning.pytorch.callbacks import Callback

from moe_lightning.callbacks import RouterStatsMonitor
from moe_lightning.cli import MoELightningCLI


class StepClock(Callback):
    """Wall time of the training steps after the first few (start-up and warm-up left out)."""

    def __init__(self, skip: int = 10) -> None:
        self.skip, self.start, self.steps = skip, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.skip:
            self.steps += 1

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.start) / self.steps


class TimedRouterStatsMonitor(RouterStatsMonitor):
    """RouterStatsMonitor that adds up the wall time of its per-batch hook, GPU work included, after warm-up."""

    def __init__(self, skip: int = 10) -> None:
        super().__init__()
        self.skip, self.seconds = skip, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx < self.skip:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        synchronize()
        start = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        synchronize()
        self.seconds += time.perf_counter() - start


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds_per_step(config: str, steps: int, monitor: bool, extra: list[str]) -> tuple[float, float]:
    """Seconds per step after warm-up, and the monitor's own seconds per step (0 without it)."""
    with tempfile.TemporaryDirectory() as root:
        args = ["--config", config, f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}",
                "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                "--trainer.enable_checkpointing=false", "--trainer.logger.init_args.save_dir=" + root, *extra]
        cli = MoELightningCLI(run=False, args=args, save_config_kwargs={"overwrite": True})
        clock = StepClock()
        timed = TimedRouterStatsMonitor(skip=clock.skip)
        cli.trainer.callbacks.append(clock)
        if monitor:
            cli.trainer.callbacks.append(timed)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return clock.seconds_per_step(), timed.seconds / clock.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more CLI overrides, e.g. --trainer.devices=1")
    args = parser.parse_args()
    times, in_hook = {False: [], True: []}, []
    for repeat in range(args.repeats):
        # ABBA order: a machine that drifts slower (or faster) run after run biases neither arm.
        for monitor in (False, True) if repeat % 2 == 0 else (True, False):
            step_seconds, hook_seconds = seconds_per_step(args.config, args.steps, monitor, args.extra)
            times[monitor].append(step_seconds)
            if monitor:
                in_hook.append(hook_seconds / step_seconds)
    without, with_monitor = statistics.median(times[False]), statistics.median(times[True])
    print(f"\n{args.config}, {args.steps} steps x {args.repeats} repeats, RouterStatsMonitor every 50 steps")
    print("| run | s/step (median) | all runs |")
    print("|---|---|---|")
    print(f"| without monitor | {without:.4f} | {', '.join(f'{t:.4f}' for t in times[False])} |")
    print(f"| with monitor | {with_monitor:.4f} | {', '.join(f'{t:.4f}' for t in times[True])} |")
    print(f"overhead: {with_monitor / without - 1:+.1%}")
    print(f"time inside the monitor's hook: {statistics.median(in_hook):.2%} of the step time "
          f"(runs: {', '.join(f'{share:.2%}' for share in in_hook)})")


if __name__ == "__main__":
    main()
