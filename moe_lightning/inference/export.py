"""A self-describing safetensors file of a :class:`MoETransformer`: weights, plus its config and router spec as JSON
metadata. Loading it runs no pickle: the tensors are raw bytes and the architecture is JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from moe_lightning.checkpoint.integrity import write_manifest
from moe_lightning.checkpoint.reading import load_safetensors_file, safetensors_metadata
from moe_lightning.models import MoETransformer, MoETransformerConfig
from moe_lightning.models.router_spec import router_factory_from_spec

FORMAT = "moe_lightning.MoETransformer/1"
FORMAT_KEY, CONFIG_KEY, ROUTER_KEY = "moe_lightning.format", "moe_lightning.config", "moe_lightning.router"


def export_safetensors(module_or_model: nn.Module, path: str | Path, router: dict[str, Any] | None = None) -> None:
    """Write the model's weights and architecture to one ``.safetensors`` file, and its hash manifest beside it
    (``<path>.manifest.json``, see :mod:`moe_lightning.checkpoint.integrity`).

    Args:
        module_or_model: a :class:`MoETransformer`, or a module holding one as ``.model`` (``MoELightningModule``).
        path: the file to write.
        router: the router spec ``{"class_path": ..., "init_args": {...}}``; needed only when the model was built
            with a router factory that is neither a Router class nor a ``functools.partial`` of one.
    """
    write_model_file(transformer_of(module_or_model, "export_safetensors"), path, router, FORMAT, "export_safetensors")


def write_model_file(
    model: MoETransformer, path: str | Path, router: dict[str, Any] | None, file_format: str, writer: str,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """The file layout every exporter shares: ``state_dict`` tensors (tied head left out) on the CPU, with the
    format, the model config and the router spec as JSON metadata, plus ``extra_metadata``. ``writer`` names the
    calling function in errors."""
    spec = router or model.router_spec
    if spec is None:
        raise ValueError(
            "the model's router factory cannot be written down as data: pass router={'class_path': ..., "
            f"'init_args': {{...}}}} to {writer}"
        )
    router_factory_from_spec(spec)  # refuse a spec that would not load back
    state = model.state_dict()
    if model.config.tie_embeddings:
        del state["head.weight"]  # the same storage as embed.weight; re-tied on load
    metadata = {
        FORMAT_KEY: file_format,
        CONFIG_KEY: json.dumps(dataclasses.asdict(model.config)),
        ROUTER_KEY: json.dumps(spec),
        **(extra_metadata or {}),
    }
    save_file({key: value.detach().cpu().contiguous() for key, value in state.items()}, str(path), metadata=metadata)
    write_manifest(path)  # beside the file: SHA-256 and metadata, checked when the engine loads it


def load_safetensors(path: str | Path) -> MoETransformer:
    """The model :func:`export_safetensors` wrote, on the CPU, every tensor in its saved dtype.

    It does not check the file against its manifest (:meth:`InferenceEngine.from_checkpoint` does); a truncated or
    corrupt file raises :class:`~moe_lightning.checkpoint.errors.ArtifactError` naming it.
    """
    metadata = safetensors_metadata(path)
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise ValueError(
            f"{path} is not an export_safetensors file: its metadata has {FORMAT_KEY}={metadata.get(FORMAT_KEY)!r}, "
            f"expected {FORMAT!r}"
        )
    model = build_model(json.loads(metadata[CONFIG_KEY]), json.loads(metadata[ROUTER_KEY]))
    load_weights(model, load_safetensors_file(path), str(path))
    return model


def build_model(config: dict[str, Any] | None, router: dict[str, Any] | None) -> MoETransformer:
    """A freshly initialised :class:`MoETransformer` from a config mapping and a router spec (None: defaults)."""
    config = config or {}
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(MoETransformerConfig)})
    if unknown:
        raise ValueError(f"unknown MoETransformerConfig fields {unknown} (written by a newer moe_lightning?)")
    return MoETransformer(MoETransformerConfig(**config), router_factory_from_spec(router) if router else None)


def load_weights(model: MoETransformer, state: dict[str, Any], source: str) -> None:
    """Install ``state`` (a ``state_dict`` of tensors) as the model's weights, keeping each tensor's dtype."""
    expected = set(model.state_dict()) - ({"head.weight"} if model.config.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit the model built from its config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # size mismatches
        raise ValueError(f"{source} does not fit the model built from its config: {error}") from error
    if model.config.tie_embeddings:
        model.head.weight = model.embed.weight


def transformer_of(module_or_model: nn.Module, caller: str) -> MoETransformer:
    """The :class:`MoETransformer` itself, or the one a module holds as ``.model``; ``caller`` names who asks."""
    model = getattr(module_or_model, "model", module_or_model)
    if not isinstance(model, MoETransformer):
        raise TypeError(f"{caller} needs a MoETransformer (or a module whose .model is one), got "
                        f"{type(model).__name__}")
    return model
