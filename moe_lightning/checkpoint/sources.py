"""Checkpoints as lazy tensor sources for :func:`moe_lightning.models.materialize.materialize`.

A *pretrained source* describes its model (``build_model()``, called on the meta device) and reads one tensor, or
one range of experts of a tensor, at a time (``names()``, ``load(name, experts)``). :func:`open_pretrained` opens
either kind we read:

- a transformers checkpoint directory (``config.json`` + safetensors shards): :class:`HFCheckpoint`;
- a ``.safetensors`` file written by :func:`moe_lightning.inference.export_safetensors`: :class:`ExportedModel`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from safetensors import SafetensorError, safe_open
from torch import Tensor

from moe_lightning.inference.export import CONFIG_KEY, FORMAT, FORMAT_KEY, ROUTER_KEY, build_model
from moe_lightning.models import MoETransformer
from moe_lightning.models.materialize import TensorSource


class PretrainedSource(TensorSource, Protocol):
    def build_model(self) -> MoETransformer:
        """The architecture, freshly initialised (on the current default device: meta, for materialize)."""
        ...


class ExportedModel:
    """A file of :func:`~moe_lightning.inference.export_safetensors`, read one tensor (or range of experts) at a time.

    Raises:
        ValueError: the file is missing, not safetensors, or not one of our exports.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            with safe_open(self.path, "pt") as f:
                metadata = f.metadata() or {}
                self._names = list(f.keys())
        except (FileNotFoundError, SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {self.path} as a safetensors file: {error}") from error
        if metadata.get(FORMAT_KEY) != FORMAT:
            raise ValueError(
                f"{self.path} is not an export_safetensors file: its metadata has {FORMAT_KEY}="
                f"{metadata.get(FORMAT_KEY)!r}, expected {FORMAT!r}"
            )
        self._config: dict[str, Any] = json.loads(metadata[CONFIG_KEY])
        self._router: dict[str, Any] = json.loads(metadata[ROUTER_KEY])

    def build_model(self) -> MoETransformer:
        return build_model(self._config, self._router)

    def names(self) -> list[str]:
        return self._names

    def load(self, name: str, experts: range | None = None) -> Tensor:
        with safe_open(self.path, "pt") as f:
            if experts is None:
                return f.get_tensor(name)
            return f.get_slice(name)[experts.start : experts.stop]


def open_pretrained(path: str | Path) -> PretrainedSource:
    """The source at ``path``: a transformers checkpoint directory or one of our ``.safetensors`` exports.

    Raises:
        ValueError: ``path`` is neither, naming what was found; or the checkpoint's own reader refused it.
    """
    path = Path(path)
    if path.is_dir():
        from moe_lightning.models.hf.checkpoint import HFCheckpoint  # transformers only for this kind

        return HFCheckpoint(path)
    if path.is_file():
        return ExportedModel(path)
    raise ValueError(
        f"pretrained={str(path)!r} does not exist: give a transformers checkpoint directory (config.json and "
        "*.safetensors) or a .safetensors file of moe-lightning export (to try a recipe, "
        "`python examples/make_tiny_hf_checkpoint.py DIR` writes a tiny random one)"
    )
