"""Write a tiny random transformers MoE checkpoint (config.json + safetensors) for the fine-tuning recipes to start
from, built with transformers on this machine (nothing is downloaded, a second or two on a CPU):

    .venv/bin/python examples/make_tiny_hf_checkpoint.py runs/hf/tiny-mixtral
    .venv/bin/moe-lightning fit --config configs/finetune-lora.yaml

Its vocabulary is the synthetic tasks datamodule's (the recipes' data), its context their sequence length; sizes
otherwise are those of the parity tests (:data:`moe_lightning.models.hf.tiny.TINY_FAMILIES`), weights seeded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_lightning.data import SyntheticTasksDataModule
from moe_lightning.models.hf.tiny import save_tiny_hf_checkpoint

MOE_FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]


def make_tiny_hf_checkpoint(
    out_dir: str | Path, family: str = "mixtral", num_layers: int = 2, max_seq_len: int = 256, seed: int = 0,
) -> Path:
    """A tiny ``family`` checkpoint in ``out_dir`` whose vocabulary covers :class:`SyntheticTasksDataModule`'s."""
    if family not in MOE_FAMILIES:
        raise ValueError(f"family={family!r} is not one of the MoE families {MOE_FAMILIES}")
    return save_tiny_hf_checkpoint(
        out_dir, family, seed, vocab_size=SyntheticTasksDataModule().vocab_size, num_hidden_layers=num_layers,
        max_position_embeddings=max_seq_len,
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="a new (or empty) directory to write the checkpoint to")
    parser.add_argument("--family", choices=MOE_FAMILIES, default="mixtral")
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--max_seq_len", type=int, default=256, help="max_position_embeddings (>= the data's seq_len)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        out_dir = make_tiny_hf_checkpoint(args.out_dir, args.family, args.num_layers, args.max_seq_len, args.seed)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"wrote a tiny random {args.family} checkpoint to {out_dir}")
    return out_dir


if __name__ == "__main__":
    main()
