"""Upcycle or keep training dense? Trains a small dense byte-level LM on the Python standard library's source, then
continues it for the same number of further steps three ways, with the same batches and optimiser settings (a fresh
AdamW with warm-up and cosine decay each): the dense model itself, its plain upcycled MoE (every FFN copied into 8
experts, top-2) and its granular upcycled MoE (each FFN cut into 2 halves, 8 half-width experts, top-2: the dense
model's active FFN width). Repeats the continuations over ``--seeds`` data orders (and router initialisations);
prints validation loss before and after, and the wall time of each run.

    .venv/bin/python examples/upcycle_stdlib.py [--dense_steps 600] [--further_steps 600] [--seeds 2]
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import time

import torch
from lightning.pytorch import Trainer, seed_everything

from moe_lightning import MoELightningModule
from moe_lightning.data import ByteTextDataModule
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.models.upcycle import upcycle
from moe_lightning.routing import TopKRouter

DENSE = MoETransformerConfig(
    vocab_size=256, dim=64, num_layers=4, num_heads=4, dense_hidden_dim=256, moe_layers=[], max_seq_len=64
)
ROUTER = functools.partial(TopKRouter, num_experts_per_token=2, load_balance_coef=0.01, z_loss_coef=0.001)
QUIET = dict(
    accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, num_sanity_val_steps=0,
)


def data(seed: int) -> ByteTextDataModule:
    return ByteTextDataModule(seq_len=64, batch_size=16, max_bytes=2**21, seed=seed)


def train(model: MoETransformer, steps: int, data_seed: int, args: argparse.Namespace) -> float:
    """Train ``model`` in place for ``steps`` steps; returns the seconds it took."""
    seed_everything(data_seed, verbose=False)
    module = MoELightningModule(model, lr=args.lr, warmup_steps=steps // 10, weight_decay=0.1)
    trainer = Trainer(max_steps=steps, limit_val_batches=0, **QUIET)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data(data_seed))
    return time.perf_counter() - started


def val_loss(model: MoETransformer, args: argparse.Namespace) -> float:
    trainer = Trainer(limit_val_batches=args.val_batches, **QUIET)
    (metrics,) = trainer.validate(MoELightningModule(model), datamodule=data(0), verbose=False)
    return metrics["val/loss"]


def parameters(model: MoETransformer) -> tuple[int, int]:
    """Total parameters, and those one token uses (the routed experts counted at top-k of E)."""
    total = sum(p.numel() for p in model.parameters())
    unused = sum(
        layer.experts.w_in_EDH.numel() + layer.experts.w_down_EFD.numel() for layer in model.moe_layers
    ) * (1 - ROUTER.keywords["num_experts_per_token"] / model.config.num_experts)
    return total, int(total - unused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense_steps", type=int, default=600, help="steps of the dense pre-training")
    parser.add_argument("--further_steps", type=int, default=600, help="steps of each continuation")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate of every run")
    parser.add_argument("--seeds", type=int, default=2, help="continuations, each with its own data order")
    parser.add_argument("--val_batches", type=int, default=64, help="validation batches of 16 x 64 bytes")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    torch.manual_seed(0)
    dense = MoETransformer(DENSE)
    seconds = train(dense, args.dense_steps, 0, args)
    print(f"dense pre-training: {args.dense_steps} steps in {seconds:.0f} s, val loss {val_loss(dense, args):.4f}")

    results: dict[str, list[tuple]] = {}
    for data_seed in range(1, args.seeds + 1):
        torch.manual_seed(data_seed)  # the fresh routers
        arms = {
            "dense (continued)": copy.deepcopy(dense),
            "upcycled 8 experts top-2": upcycle(dense, 8, ROUTER),
            "granular g=2, 8 experts top-2": upcycle(dense, 8, ROUTER, granularity=2),
        }
        for name, model in arms.items():
            before = val_loss(model, args)
            seconds = train(model, args.further_steps, data_seed, args)
            results.setdefault(name, []).append((before, val_loss(model, args), seconds))
        params = {name: parameters(model) for name, model in arms.items()}

    print(f"\nfurther training: {args.further_steps} steps each, batch 16 x 64 bytes, lr {args.lr}, "
          f"val loss over {args.val_batches} batches, data orders {list(range(1, args.seeds + 1))}")
    after_columns = "".join(f"{f'after #{i + 1}':>10}" for i in range(args.seeds))
    print(f"{'model':<32}{'params':>10}{'active':>9}{'before':>8}{after_columns}{'mean':>8}{'s/run':>7}")
    for name, runs in results.items():
        total, active = params[name]
        befores, afters, seconds = zip(*runs)
        after_values = "".join(f"{after:>10.4f}" for after in afters)
        print(f"{name:<32}{total:>10,}{active:>9,}{befores[0]:>8.4f}{after_values}"
              f"{sum(afters) / len(afters):>8.4f}{sum(seconds) / len(seconds):>7.0f}")

if __name__ == "__main__":
    main()
