"""Does the router learn which task a token belongs to? Trains ``configs/synthetic-tasks.yaml`` on the CPU twice, with
a learned router and with the router frozen at its (identical, seeded) random initialisation, and prints per layer the
normalised mutual information between task id and top-1 expert on the held-out split.

    .venv/bin/python examples/router_specialisation.py [--max_steps 600] [LightningCLI arguments...]

Further arguments go to both runs' LightningCLI, e.g. ``--model.init_args.router_lr=0.03``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from moe_lightning.analytics import RoutingCounts, layer_statistics
from moe_lightning.cli import MoELightningCLI
from moe_lightning.module import unpack_output

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic-tasks.yaml"
QUIET = [
    "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
]


def train(max_steps: int, frozen_router: bool, cli_args: list[str]) -> MoELightningCLI:
    args = ["--config", str(CONFIG), f"--trainer.max_steps={max_steps}", *QUIET, *cli_args]
    cli = MoELightningCLI(run=False, args=args, save_config_kwargs={"overwrite": True})
    if frozen_router:
        for layer in cli.model.model.moe_layers:
            layer.router.requires_grad_(False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


@torch.no_grad()
def held_out_nmi(cli: MoELightningCLI) -> list[float]:
    module, datamodule = cli.model.eval(), cli.datamodule
    counts = None
    for batch in datamodule.val_dataloader():
        _, routings = unpack_output(module(batch))
        if counts is None:
            counts = RoutingCounts.zeros(len(routings), routings[0].num_experts, len(datamodule.task_names))
        counts.add_routings(routings, batch["task_ids"])
    return [s.nmi for s in layer_statistics(counts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=600, help="training steps of each run (the recipe's 600)")
    options, cli_args = parser.parse_known_args()
    results = {}
    for name, frozen in (("learned router", False), ("frozen random router", True)):
        started = time.perf_counter()
        results[name] = held_out_nmi(train(options.max_steps, frozen, cli_args))
        print(f"{name}: {options.max_steps} steps in {time.perf_counter() - started:.0f} s")
    layers = len(next(iter(results.values())))
    print(f"\nNMI(task id; top-1 expert), held-out split, after {options.max_steps} steps")
    print(f"| router | {' | '.join(f'layer {l}' for l in range(layers))} | mean |")
    print(f"|---|{'---|' * (layers + 1)}")
    for name, nmi in results.items():
        print(f"| {name} | {' | '.join(f'{v:.3f}' for v in nmi)} | {sum(nmi) / layers:.3f} |")


if __name__ == "__main__":
    main()
