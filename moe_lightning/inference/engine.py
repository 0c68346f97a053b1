"""InferenceEngine: a trained :class:`MoETransformer` loaded without unpickling code, ready to generate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_lightning.checkpoint.errors import ArtifactError
from moe_lightning.checkpoint.integrity import check_artifact, configured_trusted_key
from moe_lightning.inference.export import load_safetensors
from moe_lightning.inference.generate import Prompts, check_per_token_routing, generate
from moe_lightning.inference.lightning_checkpoint import load_lightning_checkpoint
from moe_lightning.inference.quantization.export import is_quantized_file, load_quantized
from moe_lightning.models import MoETransformer


class InferenceEngine:
    """Holds one model in eval mode and generates from it (see :func:`generate` for the sampling arguments)."""

    def __init__(self, model: MoETransformer) -> None:
        check_per_token_routing(model)
        self.model = model.eval()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: str | Path | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, trusted_key: Any = None,
    ) -> InferenceEngine:
        """Load a trained model.

        Args:
            path: a ``.safetensors`` file written by :func:`export_safetensors` or :func:`save_quantized`
                (self-describing; preferred), or a
                Lightning ``.ckpt`` of ``MoELightningModule`` training, whose architecture comes from the run's
                LightningCLI ``config.yaml`` (see :func:`load_lightning_checkpoint`).
            config: the run's ``config.yaml`` for a ``.ckpt`` found elsewhere than in LightningCLI's layout.
            device, dtype: where and in which floating dtype to run; default: the CPU and the saved dtype.
            trusted_key: an Ed25519 public key (a PEM file, or an ``Ed25519PublicKey``) whose signature the file
                must carry (see ``moe-lightning sign``); default: the file ``$MOE_LIGHTNING_TRUSTED_KEY`` names, if
                set. With a trusted key a ``.ckpt`` is refused (its architecture comes from an unsigned YAML).

        Raises:
            ArtifactError: (a ``ValueError``) naming the file: truncated or corrupt; not matching its hash manifest
                (checked whenever the file has one: one more streaming read of the file); with a trusted key,
                unsigned or signed by another key.
        """
        return cls(load_model(path, config, trusted_key).to(device=device, dtype=dtype))

    def generate(self, prompts: Prompts, max_new_tokens: int, **sampling: Any) -> list[list[int]]:
        """New tokens per prompt; ``sampling`` are :func:`generate`'s keyword arguments."""
        return generate(self.model, prompts, max_new_tokens, **sampling)


def load_model(path: str | Path, config: str | Path | None = None, trusted_key: Any = None) -> MoETransformer:
    """The model of a checkpoint file, on the CPU, checked as :meth:`InferenceEngine.from_checkpoint` says."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory (an expert-parallel checkpoint?): consolidate it into one .ckpt with "
            "moe_lightning.checkpoint.export_consolidated, or export the trained model with export_safetensors"
        )
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"checkpoint {path} must be a .safetensors export or a Lightning .ckpt file")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    trusted_key = configured_trusted_key(trusted_key)
    if path.suffix == ".ckpt" and trusted_key is not None:
        raise ArtifactError(path, (
            f"{path} is a Lightning .ckpt and a trusted key is configured: a .ckpt cannot be signed (its architecture "
            f"comes from an unsigned config.yaml); export it with `moe-lightning export {path} OUT.safetensors`, "
            "sign OUT.safetensors and load that"))
    check_artifact(path, trusted_key)
    if path.suffix == ".ckpt":
        return load_lightning_checkpoint(path, config)
    if config is not None:
        raise ValueError(f"config={config} is for .ckpt files; {path} carries its own architecture")
    return load_quantized(path) if is_quantized_file(path) else load_safetensors(path)
