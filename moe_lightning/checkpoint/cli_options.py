"""The command-line side of artifact checks, shared by ``generate``, ``serve`` and the other subcommands."""

from __future__ import annotations

import argparse
from typing import NoReturn

from moe_lightning.checkpoint.errors import ArtifactError
from moe_lightning.checkpoint.integrity import TRUSTED_KEY_ENV


def add_trusted_key_argument(parser: argparse.ArgumentParser) -> None:
    """``--trusted-key PUBLIC_KEY``: refuse a checkpoint that this Ed25519 public key did not sign."""
    parser.add_argument("--trusted-key", default=None, metavar="PUBLIC_KEY",
                        help="an Ed25519 public key file (moe-lightning keygen): refuse a checkpoint it did not sign "
                             f"(default: the file ${TRUSTED_KEY_ENV} names, if set)")


def exit_on_artifact_error(parser: argparse.ArgumentParser, error: ArtifactError) -> NoReturn:
    """End the command with ``error`` as one line on stderr and exit status 1: a bad file is not a usage mistake,
    so no usage text."""
    parser.exit(1, f"{parser.prog}: error: {error}\n")
