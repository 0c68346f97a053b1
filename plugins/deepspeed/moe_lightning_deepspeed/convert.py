"""``python -m moe_lightning_deepspeed.convert DEEPSPEED_DIR OUT.ckpt``: a DeepSpeedExpertParallelStrategy checkpoint
as one ordinary Lightning checkpoint with every expert (see :func:`convert_to_lightning`)."""

from __future__ import annotations

import argparse

from moe_lightning_deepspeed.checkpoint import convert_to_lightning


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe_lightning_deepspeed.convert", description=__doc__)
    parser.add_argument("checkpoint", help="the directory the strategy saved (e.g. runs/.../checkpoints/last.ckpt)")
    parser.add_argument("out", help="the .ckpt file to write; moe-lightning export/generate read it with the run's "
                                    "config.yaml")
    options = parser.parse_args(args)
    try:
        convert_to_lightning(options.checkpoint, options.out)
    except ValueError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"converted: {options.checkpoint} -> {options.out}")


if __name__ == "__main__":
    main()
